FROM python:3.11-slim
RUN useradd --system --uid 700 --home /srv/sip700 sip700
WORKDIR /srv/sip700
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY config /etc/sip700
RUN pip install --no-cache-dir . && chown -R sip700 /srv/sip700
USER sip700
EXPOSE 5060/udp 5060/tcp
ENTRYPOINT ["sip700"]
CMD ["run", "--config", "/etc/sip700/proxy.yaml"]
