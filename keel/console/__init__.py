"""The web console at /console: server-rendered pages over the capabilities' own service functions."""
