#!/bin/sh
#PBS -N mounts-env
#PBS -S /bin/sh
#PBS -l nodes=1:ppn=1,walltime=00:02:00,pmem=128mb
#CBATCH --image=cbatch-test/busybox:1
# Host /tmp appears as /scratch (the queue must allow user mounts under /tmp); quotes work as in a shell,
# but nothing is expanded: write absolute paths, no $HOME or ~.
#CBATCH --mount /tmp:/scratch:rw --workdir /scratch
#CBATCH --env GREETING="hello world" --env OMP_NUM_THREADS=1
echo "$GREETING from $(pwd) with OMP_NUM_THREADS=$OMP_NUM_THREADS"
ls -ld /scratch
#CBATCH --image=ignored   (after the first command: an ordinary comment, like #PBS)
