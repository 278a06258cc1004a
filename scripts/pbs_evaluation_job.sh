#!/usr/bin/env bash
# PBS/Torque job: pipelined evaluation (examples/mpi_evaluate.py) of the model
# scripts/pbs_train_job.sh trained: rank 0 reads images, rank 1 resizes, rank 2
# normalises, the remaining ranks predict; rank 0 prints the accuracy and each stage's
# throughput and queue occupancy.
# Submit with: qsub -W depend=afterok:<train job id> scripts/pbs_evaluation_job.sh
#PBS -N disttrain-mpi-evaluate
#PBS -l select=1:ncpus=6:mpiprocs=6
#PBS -l walltime=00:30:00
#PBS -j oe
set -euo pipefail
cd "${PBS_O_WORKDIR:-.}"
NPROCS=${NPROCS:-$(wc -l < "$PBS_NODEFILE")}   # at least 4: one rank per stage
RUN=${RUN:-runs/mpi_train}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
MPI_ENV=()
if mpiexec --version 2>&1 | grep -q "Open MPI\|OpenRTE"; then
  MPI_ENV=(-x OMP_NUM_THREADS -x PATH -x PBS_NODEFILE -x PBS_JOBID ${ALLOW_ROOT:+--allow-run-as-root --oversubscribe})
fi
mpiexec -n "$NPROCS" --hostfile "$PBS_NODEFILE" "${MPI_ENV[@]}" \
  python examples/mpi_evaluate.py --run "$RUN" --queue-depth "${QUEUE_DEPTH:-4}" ${EXTRA_ARGS:-}
