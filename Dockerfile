# ocifs in a container. Run it with FUSE and share the mount with the host:
#   docker build -t ocifs .
#   docker run -d --name ocifs --device /dev/fuse --cap-add SYS_ADMIN \
#     --security-opt apparmor:unconfined -v /mnt/hub:/mnt/hub:rshared \
#     ocifs mount -f --read-only --allow-other registry-1.docker.io/library /mnt/hub
# See docs/containers.md.
FROM debian:12-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends fuse3 python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && sed -i 's/^#user_allow_other/user_allow_other/' /etc/fuse.conf
COPY pyproject.toml README.md LICENSE /src/
COPY ocifs /src/ocifs
RUN python3 -m venv /opt/ocifs && /opt/ocifs/bin/pip install --no-cache-dir /src && rm -rf /src
ENV PATH=/opt/ocifs/bin:$PATH XDG_CACHE_HOME=/var/cache
VOLUME /var/cache/ocifs
ENTRYPOINT ["ocifs"]
CMD ["--help"]
