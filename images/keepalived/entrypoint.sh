#!/bin/sh
# Render keepalived's configuration from the environment, then run it in the
# foreground (VRRP only).
#   VRRP_VIP          the shared address with its prefix, e.g. 10.0.0.100/24 (required)
#   VRRP_PEERS        the other gateway(s)' addresses, comma separated: unicast VRRP,
#                     which also works where multicast is filtered (clouds)
#   VRRP_PRIORITY     default 100; the preferred gateway gets a higher one
#   VRRP_ROUTER_ID    virtual_router_id, 1-255, the same on both (default 51)
#   VRRP_ADVERT       advertisement interval, s (default 1; VRRPv3 allows 0.5)
#   VRRP_CHECK_EVERY  how often gateway-check runs, s (default 1)
#   VRRP_INTERFACE    default: the interface holding an address in the VIP's subnet
set -eu
: "${VRRP_VIP:?VRRP_VIP must be set, e.g. 10.0.0.100/24}"
prefix="${VRRP_VIP#*/}"
vip="${VRRP_VIP%/*}"
net3="${vip%.*}"

iface="${VRRP_INTERFACE:-}"
if [ -z "$iface" ]; then
  # The interface with an address in the VIP's /24 (the LAN both gateways are on).
  iface=$(ip -o -4 addr show | awk -v n="$net3." '$4 ~ "^"n {print $2; exit}')
fi
if [ -z "$iface" ]; then
  echo "vrrp: no interface with an address in ${net3}.0/${prefix}; set VRRP_INTERFACE" >&2
  exit 2
fi
src=$(ip -o -4 addr show dev "$iface" | awk '{split($4, a, "/"); print a[1]; exit}')

peers=""
for peer in $(echo "${VRRP_PEERS:-}" | tr ',' ' '); do
  peers="${peers}        ${peer}
"
done
unicast=""
if [ -n "$peers" ]; then
  unicast="    unicast_src_ip ${src}
    unicast_peer {
${peers}    }"
fi

mkdir -p /run/keepalived
conf=/run/keepalived/keepalived.conf
cat > "$conf" <<CONF
global_defs {
    router_id $(hostname)
    script_user root
    enable_script_security
    vrrp_garp_master_delay 0
    vrrp_garp_master_repeat 3
    vrrp_version 3
}

vrrp_script gateway_ok {
    script "/usr/local/bin/gateway-check"
    interval ${VRRP_CHECK_EVERY:-1}
    timeout 2
    fall 1
    rise 2
}

vrrp_instance gateway {
    state BACKUP
    interface ${iface}
    virtual_router_id ${VRRP_ROUTER_ID:-51}
    priority ${VRRP_PRIORITY:-100}
    advert_int ${VRRP_ADVERT:-1}
    nopreempt
${unicast}
    virtual_ipaddress {
        ${vip}/${prefix} dev ${iface}
    }
    track_script {
        gateway_ok
    }
}
CONF
echo "vrrp: ${vip}/${prefix} on ${iface} (${src}), priority ${VRRP_PRIORITY:-100}, peers: ${VRRP_PEERS:-multicast}"
keepalived --dont-fork --log-console --vrrp --use-file "$conf" \
  --pid /run/keepalived/keepalived.pid --vrrp_pid /run/keepalived/vrrp.pid &
keepalived=$!
trap 'kill -TERM "$keepalived" 2>/dev/null' TERM INT
# This sidecar lives in its gateway's network namespace. When the gateway restarts,
# its interfaces go with the old namespace: exit, so that Docker starts the sidecar
# again in the new one (restart: unless-stopped) instead of guarding nothing.
while kill -0 "$keepalived" 2>/dev/null; do
  if ! ip link show "$iface" >/dev/null 2>&1; then
    echo "vrrp: ${iface} is gone (the gateway stopped or restarted); exiting" >&2
    kill -TERM "$keepalived" 2>/dev/null || true
    wait "$keepalived" || true
    exit 1
  fi
  sleep 1
done
wait "$keepalived"
