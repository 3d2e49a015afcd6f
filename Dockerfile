# The main node in a container: docker build -t retire-cluster . &&
#   docker run -p 8080:8080 -p 5000:5000 -v rc-data:/data retire-cluster
# (port 8080: workers and clients; 5000: the web dashboard and HTTP API)
FROM python:3.11-slim
RUN useradd --create-home --uid 1000 cluster
WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY retire_cluster ./retire_cluster
COPY schemas ./schemas
RUN pip install --no-cache-dir . && mkdir /data && chown cluster /data
USER cluster
VOLUME /data
EXPOSE 8080 5000
ENTRYPOINT ["retire-cluster"]
CMD ["main", "--data-dir", "/data"]
