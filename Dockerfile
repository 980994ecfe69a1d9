# The defai-kit image used by the docker-compose stack (api, scheduler, jupyter). Not built on the development machines,
# which have no Docker engine; see README "The production stack".
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEFAI_HOME=/var/lib/defai
WORKDIR /app
COPY pyproject.toml README.md ./
COPY defai_kit ./defai_kit
COPY nbs ./nbs
COPY pipelines ./pipelines
# CPU build of torch: the PyTorch CPU index keeps the image free of CUDA. Use TORCH_INDEX=.../cu124 for GPUs.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir uv==0.13.9 \
 && uv pip install --system --no-cache --extra-index-url "$TORCH_INDEX" --index-strategy unsafe-best-match ".[dev]"
RUN useradd --create-home --uid 1000 defai && mkdir -p /var/lib/defai && chown defai /var/lib/defai
USER defai
EXPOSE 8000 8888
CMD ["defai", "api", "serve"]
