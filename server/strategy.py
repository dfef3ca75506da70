"""The legacy Flower strategy SecAgg+ drives: hand out one round's instructions, keep the sum.

SecAgg+ exists only on Flower's legacy path, where a `Strategy` chooses clients
(`configure_fit`) and receives the unmasked aggregate (`aggregate_fit`). Here both are thin:
the coordinator decides the candidates and the sites, and the aggregate is stored untouched
for `common.secure_sum.decode_sum`. If the workflow halts (too few survivors) it never calls
`aggregate_fit`; `aggregate` then stays None and the caller reports the failure.
"""

from __future__ import annotations

import numpy as np
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.serverapp import Grid

from common.protocol import INSTRUCTIONS_KEY, RoundInstructions


class HistogramSumStrategy(Strategy):
    """One round: the same instructions to every chosen site; keep the aggregate."""

    def __init__(self, grid: Grid, node_ids: list[int], instructions: RoundInstructions):
        self.grid = grid
        self.node_ids = list(node_ids)
        self.instructions = instructions
        self.aggregate: np.ndarray | None = None
        self.result_node_ids: list[int] = []
        self.failures: list[BaseException] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return Parameters(tensors=[], tensor_type="")

    def configure_fit(self, server_round, parameters, client_manager):
        config = {INSTRUCTIONS_KEY: self.instructions.model_dump_json()}
        run_id = self.grid.run.run_id
        empty = Parameters(tensors=[], tensor_type="")
        return [
            (GridClientProxy(nid, self.grid, run_id), FitIns(parameters=empty, config=config))
            for nid in self.node_ids
        ]

    def aggregate_fit(self, server_round, results, failures):
        self.result_node_ids = [proxy.node_id for proxy, _ in results]
        self.failures = list(failures)
        if results:
            arrays = parameters_to_ndarrays(results[0][1].parameters)
            self.aggregate = np.asarray(arrays[0], dtype=np.float64)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None
