# kiln's container image: three stages.
#
#   docker build -t kiln:0.1.0 .
#
# 1. web:     the browser pages (Vite), which the kiln binary embeds.
# 2. build:   kiln and the sandbox library the zygote loads
#             (libkiln_sandbox.so, beside the binary).
# 3. runtime: Debian's python3 (the base the Python runtime is built from),
#             kiln, and the "full" Python runtime, BUILT INTO THE IMAGE
#             (`kiln runtime build` at image build time).
#
# Why the runtime is in the image rather than built on first start: a
# build downloads ~30 packages from PyPI and takes about a minute; on first
# start every pod of a StatefulSet would do it again (a cluster's pods need
# egress to PyPI just to start, start slowly, and could each resolve a
# different version). In the image it is built once, pinned with the image
# digest, identical on every node, and a pod is ready in seconds (its
# readiness probe waits for the first kernel, not for pip).

FROM node:20-bookworm AS web
WORKDIR /src/web
COPY web/package.json web/package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error
COPY web/ ./
RUN npm run build

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
COPY --from=web /src/web/dist web/dist
RUN cargo build --release --locked -p kiln -p kiln-sandbox \
 && install -D -m 0755 target/release/kiln /out/kiln \
 && install -D -m 0644 target/release/libkiln_sandbox.so /out/libkiln_sandbox.so

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/kiln /out/libkiln_sandbox.so /usr/local/lib/kiln/
RUN ln -s /usr/local/lib/kiln/kiln /usr/local/bin/kiln
# Not under /tmp, /etc, /run/kiln or /home/user: those are replaced inside
# every session's sandbox, which must see the runtime.
ENV KILN_CACHE_DIR=/opt/kiln/cache \
    KILN_DATA_DIR=/var/lib/kiln \
    KILN_LISTEN=0.0.0.0:8787 \
    KILN_PROFILE=full \
    KILN_LOG_FORMAT=json
RUN kiln runtime build --profile full
EXPOSE 8787
# tini reaps what is not kiln's and passes SIGTERM on, which starts the drain.
ENTRYPOINT ["/usr/bin/tini", "--", "kiln"]
CMD ["serve"]
