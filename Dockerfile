# One image for every service of docker-compose.yml: migrate, worker, beat, flower.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

COPY pyproject.toml README.md constraints.txt ./
COPY models ./models
COPY migrations ./migrations
COPY producer ./producer
COPY worker ./worker
RUN pip install -c constraints.txt '.[flower]' && useradd --create-home --uid 1000 adpa \
    && mkdir -p /data/documents && chown -R adpa /data

USER adpa
ENV ADPA_DATA_DIR=/data ADPA_STORAGE_URL=file:///data/documents
CMD ["adpa", "--help"]
