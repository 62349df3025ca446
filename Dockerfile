# One image for every process of vmportal: web, worker, beat and listener.
FROM python:3.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 VMPORTAL_VAR_DIR=/var/lib/vmportal
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc pkg-config libvirt-dev libvirt-clients nodejs npm \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY vmportal vmportal
COPY provisioning provisioning
RUN pip install .
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund && mkdir -p static/vendor \
 && cp node_modules/htmx.org/dist/htmx.min.js static/vendor/ \
 && cp node_modules/htmx-ext-sse/sse.js static/vendor/htmx-ext-sse.js
COPY manage.py Procfile ./
COPY templates templates
COPY static static
RUN mkdir -p "$VMPORTAL_VAR_DIR" && SECRET_KEY=build python manage.py collectstatic --noinput -v0
EXPOSE 8000
CMD ["uvicorn", "vmportal.asgi:application", "--host", "0.0.0.0", "--port", "8000"]
