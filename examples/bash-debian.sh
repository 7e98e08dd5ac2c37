#!/bin/bash
#PBS -N bash-debian
#PBS -l nodes=1:ppn=2,walltime=00:05:00,mem=256mb
#CBATCH --image cbatch-test/debian:12
#CBATCH --readonly
# Bash features in a Debian image; the image root is read-only, the home and TMPDIR are writable.
set -euo pipefail
declare -A seen=([debian]=12)
echo "bash ${BASH_VERSION} on debian ${seen[debian]}, $(nproc) cpu(s)"
echo "args: $*"
