#!/bin/bash
# aiia-healthcheck [PATH]: GET PATH (default /health) from nginx on 127.0.0.1:80 and
# succeed only on a 200 answer. Pure bash (/dev/tcp), so the image needs no HTTP client.
set -euo pipefail

path=${1:-/health}
if ! exec 3<>/dev/tcp/127.0.0.1/80; then
    echo "unhealthy: nothing listens on 127.0.0.1:80" >&2
    exit 1
fi
printf 'GET %s HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n' "$path" >&3
status_line=
read -r -t 8 status_line <&3 || true
exec 3<&-
case $status_line in
    "HTTP/1."?" 200 "*) exit 0 ;;
esac
echo "unhealthy: GET $path answered '${status_line%$'\r'}'" >&2
exit 1
