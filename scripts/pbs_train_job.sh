#!/usr/bin/env bash
# PBS/Torque job: MPI-style data-parallel training (examples/mpi_train.py) over
# every slot PBS gives the job, launched with mpiexec, no torchrun.
# Submit with: qsub scripts/pbs_train_job.sh   (resubmitting resumes from OUT/checkpoint.dts)
#
# Each process learns its rank from mpiexec (OMPI_COMM_WORLD_* or PMI_*); disttrain.init()
# takes the rendezvous host from $PBS_NODEFILE (its first host, where rank 0 runs) and a port
# derived from $PBS_JOBID, so nothing needs exporting (set MASTER_ADDR/MASTER_PORT to override).
#PBS -N disttrain-mpi-train
#PBS -l select=2:ncpus=4:mpiprocs=4
#PBS -l walltime=01:00:00
#PBS -j oe
set -euo pipefail
cd "${PBS_O_WORKDIR:-.}"
NPROCS=${NPROCS:-$(wc -l < "$PBS_NODEFILE")}   # one line per MPI slot
OUT=${OUT:-runs/mpi_train}                       # on a file system every node sees
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# -x passes the variable to the remote ranks (Open MPI); MPICH's Hydra passes the environment itself.
MPI_ENV=()
if mpiexec --version 2>&1 | grep -q "Open MPI\|OpenRTE"; then
  MPI_ENV=(-x OMP_NUM_THREADS -x PATH -x PBS_NODEFILE -x PBS_JOBID ${ALLOW_ROOT:+--allow-run-as-root --oversubscribe})
fi
mpiexec -n "$NPROCS" --hostfile "$PBS_NODEFILE" "${MPI_ENV[@]}" \
  python examples/mpi_train.py --out "$OUT" --resume --epochs "${EPOCHS:-4}" ${EXTRA_ARGS:-}
# The snapshot trainer runs the same way: each mpiexec process is one rank.
#   mpiexec -n "$NPROCS" --hostfile "$PBS_NODEFILE" disttrain train -m resnet18 --dataset cifar10 -d ~/data/cifar10
