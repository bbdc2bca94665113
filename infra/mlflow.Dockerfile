# The MLflow tracking server of infra/docker-compose.yml: MLflow with the PostgreSQL driver and boto3 for MinIO/S3.
# (A dry-run resolution of these three pins with pip succeeded on 2026-11-23; the image itself was not built here.)
FROM python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install mlflow==3.17.2 "psycopg[binary]==3.3.9" boto3==1.44.5
EXPOSE 5000
