"""The edge around the relay processes: Nginx's config rendered at start
(`nginx_conf`) and its list of relay workers and engine fallbacks kept in sync
with the store (`nginx_sync`), how many relay workers run (`workers`), the
watchdog that takes a frozen worker out of rotation and rotates the access log
(`watchdog`, `access_log`). Nothing here touches a request's bytes."""
