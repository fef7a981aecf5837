#!/bin/sh
# keepalived's track script: this gateway serves when both its Nginx and its relay
# answer within the bound. A frozen or dead gateway fails it and gives the address up
# at once (a priority-0 advert), instead of waiting out the VRRP timers.
bound="${VRRP_CHECK_TIMEOUT:-0.8}"
curl -fsS -o /dev/null -m "$bound" http://127.0.0.1:8003/stub_status \
  && curl -fsS -o /dev/null -m "$bound" http://127.0.0.1:8002/relay/status
