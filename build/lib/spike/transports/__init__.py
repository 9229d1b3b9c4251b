"""anyio + h11 transports: mTLS HTTP/1.1 server and client, and the custody driver.

The only layer that awaits or touches sockets.
"""
