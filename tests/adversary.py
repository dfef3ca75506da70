"""A malicious coordinator for the adversarial tests: it runs the real protocol and cheats.

Everything the sites see comes from Flower's real SecAgg+ server workflow, with one stage
replaced by the attacker's. The attacker keeps every message (CoordinatorGrid), so it holds
each site's masked vector, and tries to rebuild one site's plaintext from what the sites
release. `recover_vector` is the arithmetic of Flower's own unmasking applied to ONE site.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.workflow import SecAggPlusWorkflow

from common.secure_sum import SITE_WEIGHT, ExactSumSettings


def masked_vector_of(grid, node: int, group: str) -> list[np.ndarray] | None:
    """The masked vector `node` sent in round `group`, as the coordinator received it."""
    from flwr.common import bytes_to_ndarray

    for msg in grid.received:
        if msg.has_error() or msg.metadata.src_node_id != node or msg.metadata.group_id != group:
            continue
        cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if cfg is not None and Key.MASKED_PARAMETERS in cfg:
            return [bytes_to_ndarray(b) for b in cfg[Key.MASKED_PARAMETERS]]
    return None


def recover_vector(masked, rd_seed: bytes, sk1: bytes, target: int, public_keys: dict,
                   neighbours, exact: ExactSumSettings) -> np.ndarray:
    """One site's plaintext from its masked vector, its mask seed and its pairwise key."""
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_extract,
        parameters_addition,
        parameters_mod,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import dequantize

    from common.secure_keys import bytes_to_private_key, bytes_to_public_key, generate_shared_key
    from common.secure_masks import crypto_rand_gen

    mod = exact.modulus_range
    dims = [a.shape for a in masked]
    vec = parameters_subtraction(masked, crypto_rand_gen(rd_seed, mod, dims))
    for other in neighbours:
        if other == target:
            continue
        key = generate_shared_key(
            bytes_to_private_key(sk1), bytes_to_public_key(public_keys[other][0])
        )
        pairwise = crypto_rand_gen(key, mod, dims)
        # The target added the mask for smaller ids and subtracted it for larger ones.
        vec = (parameters_subtraction if target > other else parameters_addition)(vec, pairwise)
    vec = parameters_mod(vec, mod)
    _, params = factor_extract(vec)
    plain = dequantize(params, exact.clipping_range, exact.quantization_range)
    return np.rint(plain[0]).astype(np.int64)


class BothSharesAttack(SecAggPlusWorkflow):
    """Honest until UNMASK; then asks the other sites for `target`'s mask-seed share AND its
    pairwise-key share, and rebuilds the target's vector from them.

    `split=False`: every other site gets one list naming the target active and dead (the
    attack on Flower's unchecked mod). `split=True`: the strongest form against a site that
    refuses overlapping lists: half the sites are told the target is active, the other half
    that it is dead, each list otherwise plausible.
    """

    def __init__(self, target: int, *, split: bool, exact: ExactSumSettings, **kw):
        super().__init__(**kw)
        self.target, self.split, self.exact = target, split, exact
        self.recovered: np.ndarray | None = None
        self.shares_seen = (0, 0)

    def unmask_stage(self, grid, context, state) -> bool:
        from flwr.common.secure_aggregation.crypto.shamir import combine_shares
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
        from flwr.server.workflow.constant import Key as WorkflowKey

        group = str(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        everyone = sorted(state.sampled_node_ids)
        others = [n for n in everyone if n != self.target]
        msgs = []
        for i, node in enumerate(others):
            if not self.split:
                active, dead = everyone, [self.target]
            elif i % 2 == 0:
                active, dead = everyone, []
            else:
                active, dead = [n for n in everyone if n != self.target], [self.target]
            cfg = ConfigRecord({
                Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active,
                Key.DEAD_NODE_ID_LIST: dead,
            })
            msgs.append(Message(RecordDict({RECORD_KEY_CONFIGS: cfg}), dst_node_id=node,
                                message_type=MessageType.TRAIN, group_id=group))
        seed_shares, key_shares = [], []
        for reply in grid.send_and_receive(msgs, timeout=self.timeout):
            if reply.has_error():
                continue
            res = reply.content.config_records[RECORD_KEY_CONFIGS]
            nids, shares = list(res[Key.NODE_ID_LIST]), list(res[Key.SHARE_LIST])
            sent = next(m for m in msgs if m.metadata.dst_node_id == reply.metadata.src_node_id)
            n_active = len(sent.content.config_records[RECORD_KEY_CONFIGS][
                Key.ACTIVE_NODE_ID_LIST])
            for pos, (owner, share) in enumerate(zip(nids, shares, strict=True)):
                if owner == self.target:
                    (seed_shares if pos < n_active else key_shares).append(share)
        self.shares_seen = (len(seed_shares), len(key_shares))
        masked = masked_vector_of(grid, self.target, group)
        if masked is None or min(self.shares_seen) < state.threshold:
            return False
        self.recovered = recover_vector(
            masked, combine_shares(seed_shares), combine_shares(key_shares), self.target,
            state.nid_to_publickeys, state.nid_to_neighbours[self.target], self.exact,
        )
        return False


def run_attack(grid, node_ids, instructions, *, target: int, split: bool, threshold) -> tuple:
    """Run one SecAgg+ round with the attacker's UNMASK; (recovered vector or None, shares)."""
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    from common.secure_masks import install
    from server.strategy import HistogramSumStrategy

    install()
    exact = ExactSumSettings()
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    legacy = LegacyContext(ctx, config=ServerConfig(num_rounds=1),
                           strategy=HistogramSumStrategy(grid, node_ids, instructions))
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: instructions.round}
    )
    legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    attack = BothSharesAttack(
        target, split=split, exact=exact, num_shares=1.0, reconstruction_threshold=threshold,
        max_weight=float(SITE_WEIGHT), clipping_range=exact.clipping_range,
        quantization_range=exact.quantization_range, modulus_range=exact.modulus_range,
        timeout=10.0,
    )
    attack(grid, legacy)
    return attack.recovered, attack.shares_seen
