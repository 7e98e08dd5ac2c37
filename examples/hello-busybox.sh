#!/bin/sh
#PBS -N hello
#PBS -S /bin/sh
#PBS -l nodes=1:ppn=1,walltime=00:01:00,mem=64mb
#CBATCH --image=cbatch-test/busybox:1
# The simplest containerised job: print where it runs.
echo "hello from $(hostname) as $(id -un) in ${CBATCH_IMAGE}"
cat /etc/os-release 2>/dev/null | head -n 1
