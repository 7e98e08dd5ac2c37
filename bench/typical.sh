#!/bin/sh
#PBS -N simulate
#PBS -l nodes=1:ppn=2,walltime=02:00:00,mem=2gb
#PBS -q batch
#PBS -j oe
#PBS -m ae
#CBATCH --image=cbatch-bench/busybox:1
#CBATCH --env OMP_NUM_THREADS=2
# A typical job script for the submit-filter and `cbatch check` timings (bench/clicalls.py).
cd "$PBS_O_WORKDIR"
./simulate --steps 1000 input.dat > output.dat
