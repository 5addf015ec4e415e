FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY consumer ./consumer
COPY producer_sim ./producer_sim
COPY sql ./sql
RUN pip install --no-cache-dir .
USER nobody
EXPOSE 8080
CMD ["python", "-m", "consumer", "run"]
