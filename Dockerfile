# relayrl image: CPU build by default; `--build-arg EXTRA=gpu` for CUDA machines.
FROM python:3.11-slim
ARG EXTRA=cpu
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir -e ".[${EXTRA}]" \
 && pip uninstall -y torchvision torchaudio torchcodec || true
ENV RAY_AUTH_MODE=token
