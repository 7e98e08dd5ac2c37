#!/bin/bash
#PBS -N native
#PBS -l nodes=1:ppn=1,walltime=00:01:00
#CBATCH --image=native
# Runs without a container, exactly as pbs_mom would run it (where the queue allows native jobs).
echo "native on $(hostname): ${PBS_JOBID:-no job id}"
