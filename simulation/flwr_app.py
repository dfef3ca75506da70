"""The apps `flwr run .` starts: the coordinator and hospital apps with the demo pair as default.

Why here and not in `server/` or `client/`: the demo parents belong to the simulation, and a
hospital's or coordinator's runtime path must never reach up into it. A `flwr run .` local
simulation is a simulation, so this top-level module passes the demo pair down to the apps
when the run config names no parents. Deployments run `server.server_app:app` and
`client.client_app:app` (`fedmerge coordinator submit` stages those), which have no default.
"""

from __future__ import annotations

from client.client_app import make_client_app
from server.server_app import make_server_app
from simulation.demo_parents import demo_parent_dirs

server_app = make_server_app(default_parents=demo_parent_dirs)
client_app = make_client_app(default_parents=demo_parent_dirs)
