"""The wire: frames on a stream (framing.py), the typed messages they carry (messages.py), and the
threaded socket server that serves them (server.py). Shared by the agent, its clients and the peer links."""
