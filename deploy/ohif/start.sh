#!/bin/sh
# Entry point of the ohif service (compose.yaml): writes the header nginx sends to Orthanc with
# every /dicom-web/ request (HTTP basic, from ORTHANC_USER and ORTHANC_PASSWORD, which never reach
# the browser), then runs the command (nginx). The file lives in /tmp, the image's writable place.
: "${ORTHANC_USER:?set ORTHANC_USER}" "${ORTHANC_PASSWORD:?set ORTHANC_PASSWORD}"
set -eu
auth_file="${OHIF_ORTHANC_AUTH_FILE:-/tmp/orthanc-auth.conf}"
credentials=$(printf '%s:%s' "$ORTHANC_USER" "$ORTHANC_PASSWORD" | base64 | tr -d '\n')
umask 077
printf 'proxy_set_header Authorization "Basic %s";\n' "$credentials" > "$auth_file"
exec "$@"
