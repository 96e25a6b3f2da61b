"""The head of a test's supervisord.conf: socket, daemon settings and the RPC interface.

The text is a str.format template with one field, {runtime}, the folder that contains the
socket, the pid file and the logs. Tests add their [group:...] and [program:...] sections.
"""

SUPERVISORD_HEAD = """
[unix_http_server]
file={runtime}/supervisord.sock
chmod=0700

[supervisord]
logfile={runtime}/supervisord.log
pidfile={runtime}/supervisord.pid
childlogdir={runtime}
nodaemon=true

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
"""
