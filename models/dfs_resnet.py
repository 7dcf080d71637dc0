"""The DFS network: a CIFAR ResNet whose blocks 2..3n are gated per sample (docs/spec.md §3-§4).

For each gated block the gate picks one option: skip (the block's shortcut), a bitwidth
(weights and input activations of the block's convs fake-quantized), or full precision.
Training computes every option and mixes them with the straight-through mask, keeping in the
autograd graph only the options that some sample chose; inference computes only the option
each sample chose, grouping the batch by decision.
"""
import torch
import torch.nn as nn

from models.cost import (computation_percentage, option_bits, option_costs, option_names,
                         parse_costs, parse_options, parse_policy)
from models.gate import GateEmbedding, LSTMGate
from models.norms import copy_shared_norms, make_option_norms, norms_of, parse_bn
from models.resnet import CifarResNet, init_weights
from quantize import input_range

EXECUTIONS = ("dynamic", "mixed")
HALVES = ("marked", "unmarked")  # the two routes of a fixed per-input routing (`routes`)


def has_mark(x):
    """[B] bool: which images of a fashion-mnist-marked* batch carry the coloured frame.

    Fashion-MNIST is gray: its three channels are equal, after normalisation too (each channel is
    normalised with the same mean and std), so an image has a colour exactly where it has a frame, and
    the training crops and flips keep part of the frame in view (data.mark). No host sync.
    """
    return (x.amax(1) != x.amin(1)).flatten(1).any(1)


@torch.no_grad()
def module_macs(model, image_size=32):
    """Multiply-accumulates per image of every Conv2d/Linear, from one full-precision pass."""
    macs, handles = {}, []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):  # out elements x (in / groups x kernel)
            handles.append(m.register_forward_hook(
                lambda m, i, out: macs.__setitem__(m, out[0].numel() * m.weight[0].numel())))
    was_training = model.training
    model.eval()
    try:
        CifarResNet.forward(model, torch.zeros(1, 3, image_size, image_size,
                                               device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return macs


def mix(candidates, hard):
    """sum_k hard[:, k] * candidates[k]: each sample's chosen output, differentiable in `hard`."""
    out = 0
    for k, c in enumerate(candidates):
        out = out + hard[:, k].view(-1, *([1] * (c.dim() - 1))) * c
    return out


def option_counts(hard, choice=None):
    """How many samples chose each option, as a Python list (a host sync)."""
    choice = hard.detach().argmax(1) if choice is None else choice
    return torch.bincount(choice, minlength=hard.shape[1]).tolist()


class DFSResNet(CifarResNet):
    """CIFAR ResNet with a recurrent gate choosing an execution option for every block but the first.

    forward(x, execution="dynamic"|"mixed", force_option=None) -> (logits [B, classes],
    decisions [B, 3n-1, options]). Shares parameter names with `CifarResNet`, so a stage-1
    state dict loads with only the gate's parameters missing (`load_backbone`).

    policy: a static network (not the paper's; a baseline): one option per gated block for
    every input (e.g. ("skip", 8, 8, ...)), the gate unused. `forward` then runs it by default.
    costs: a measured cost table instead of (b/32)^2 for the penalty and the computation percentage.
    bn: "shared" (the paper's) or "per-option" (a departure, models/norms.py): one BN set per option of
    every gated block, with statistics from the images routed to it. A static policy has one option
    per block, so its blocks' own BNs already are per-option: it ignores the flag.
    routes: a fixed per-input routing for the marked data sets (not the paper's; an oracle): {"marked":
    policy, "unmarked": policy}, each image taking its half's policy (`has_mark`), the gate unused. With no
    gate to train, training too runs each image through its own option only (`run_dynamic`), so with the
    same policy for both halves it is the static `policy` network.
    """

    def __init__(self, depth=38, num_classes=10, options=None, stochastic_act_rounding=False, policy=None,
                 costs=None, bn=None, routes=None):
        super().__init__(depth, num_classes, stochastic_act_rounding)
        self.options = parse_options(options)
        self.option_names = option_names(self.options)
        self.policy = None if policy is None else parse_policy(policy, self.options, len(self.blocks) - 1)
        self.register_buffer("routes", None if routes is None else self.parse_routes(routes), persistent=False)
        self.quantized = any(not isinstance(o, str) for o in self.options)  # some option has bits
        self.gate_embeds = nn.ModuleList(GateEmbedding(b.conv2.out_channels) for b in self.blocks[:-1])
        self.gate = LSTMGate(len(self.options))
        init_weights(self.gate_embeds)
        init_weights(self.gate)
        self.bn = "shared" if self.policy is not None else parse_bn(bn)
        parse_bn(bn)  # a bad name is refused with a policy too
        if self.bn == "per-option":  # initialised from the shared BNs (copy_shared_norms after a load)
            self.option_norms = make_option_norms(self.blocks[1:], self.option_names)
        # costs: the paper's (b/32)^2, or a measured table ([O] or [G, O]; a departure, `parse_costs`)
        table = option_costs(self.options) if costs is None else parse_costs(costs, self.options, len(self.gate_embeds))
        self.register_buffer("option_costs", table, persistent=False)
        self._register_macs()
        self.gate_only = False  # train_dfs.py --train gate: see train()

    def train(self, mode=True):
        """nn.Module.train. With `gate_only` set (train_dfs.py --train gate, a departure), everything
        but the gate stays in eval mode in training: its BNs normalise with their running statistics
        and its quantizers with their running ranges, neither updated, and no routed (per-option)
        batch statistics are taken; only the gate (embeddings, LSTM, head) is in training mode."""
        super().train(mode)
        if mode and getattr(self, "gate_only", False):  # (nn.Module.__init__ and _register_macs call train first)
            for name, module in self.named_children():
                if name not in ("gate", "gate_embeds"):
                    module.eval()
        return self

    def _register_macs(self):
        """Per-block MACs from the built modules, for the whole-network report (`complexity`)."""
        macs = module_macs(self)
        block = [sum(macs.get(m, 0) for m in b.modules()) for b in self.blocks]
        skip = [macs[b.shortcut_conv] if b.projection else 0 for b in self.blocks[1:]]
        self.fixed_macs = macs[self.conv1] + block[0] + macs[self.fc]  # stem, block 1, classifier
        self.register_buffer("block_macs", torch.tensor(block[1:], dtype=torch.float32), persistent=False)
        skip_share = torch.tensor(skip, dtype=torch.float32) / self.block_macs
        bitops = option_costs(self.options).repeat(len(skip), 1)  # [G, O] BitOPs relative to the block at full
        executed = torch.ones_like(bitops)
        if "skip" in self.options:
            bitops[:, self.options.index("skip")] = skip_share  # the projection shortcut, full precision
            executed[:, self.options.index("skip")] = skip_share
        self.register_buffer("bitops_table", bitops, persistent=False)
        self.register_buffer("executed_table", executed, persistent=False)

    def parse_routes(self, routes):
        """{"marked": policy, "unmarked": policy} as a [2, G] tensor of option indices; ValueError otherwise."""
        if self.policy is not None:
            raise ValueError("a network has either a static policy or a per-input routing, not both")
        if not isinstance(routes, dict) or set(routes) != set(HALVES):
            raise ValueError(f"a routing names a policy for each of {HALVES}, got {routes!r}")
        table = [parse_policy(routes[half], self.options, len(self.blocks) - 1) for half in HALVES]
        return torch.tensor(table)

    def route_names(self):
        """The routing as {half: option names per gated block} (None without one)."""
        if self.routes is None:
            return None
        return {half: [self.option_names[k] for k in row] for half, row in zip(HALVES, self.routes.tolist())}

    def routed_choices(self, x, table=None):
        """[B, G] option indices of a per-half routing (`table`, [2, G] as `parse_routes` makes; default
        the fixed routing `routes`): each image its half's policy."""
        table = self.routes if table is None else table
        return torch.where(has_mark(x)[:, None], table[0], table[1])

    def computation_percentage(self, decisions):
        """The paper's computation percentage (every gated block weighs the same)."""
        return computation_percentage(decisions, self.option_costs)

    def complexity(self, decisions):
        """Whole-network figures per image: executed MACs and BitOPs as % of the full-precision network.

        Counts the stem, block 1, the classifier and skip's projection shortcuts (at full
        precision); leaves out the gates (about 1k MACs per block) and BN/ReLU/pooling.
        """
        full = self.fixed_macs + self.block_macs.sum()
        return {
            "macs": computation_percentage(decisions, self.executed_table, self.block_macs, self.fixed_macs) * full / 100,
            "bitops_percentage": computation_percentage(decisions, self.bitops_table, self.block_macs, self.fixed_macs),
        }

    def norms(self, g, k, routed=None):
        """The batch norms of option k at gated block g: None (the block's own, shared) or, with
        per-option BN, (bn1, bn2, shortcut_bn), in training with the statistics of `routed` images."""
        if self.bn == "shared":
            return None
        return norms_of(self.option_norms[g], self.blocks[g + 1], self.option_names[k], routed)

    def run_option(self, block, x, k, x_range=None, norms=None):
        """Output of `block` on `x` under option index k (norms: see `norms`)."""
        option = self.options[k]
        if option == "skip":
            return block.shortcut(x, norm=norms[2] if norms else None)
        return block(x, option_bits(option), x_range, norms)

    def option_parameters(self, g, k):
        """The parameters option k of gated block g computes with."""
        block, name = self.blocks[g + 1], self.option_names[k]
        if name == "skip":
            return [p for n, p in block.named_parameters() if n.startswith("shortcut_")]
        if self.bn == "shared":
            return list(block.parameters())
        return [p for n, p in block.named_parameters() if "bn" not in n] + list(self.option_norms[g][name].parameters())

    def run_all(self, g, block, x, hard, sparse):
        """Every option's output mixed by `hard` (spec §3): training, and the mixed reference.

        sparse: compute the options that no sample chose without autograd. Their mask column is
        exactly 0, so they add nothing to any gradient; what is needed of them, their values (the
        gate's straight-through gradient is <dL/dout, out_k>) and their BN and range-buffer
        updates, is unchanged. Same loss, gradients and buffers as the dense formulation, bit
        for bit, for one host sync per block (which options were chosen).
        """
        # The input's activation range, reduced once for every bitwidth (and the projection).
        x_range = input_range(x) if self.training and self.quantized and not self.gate_only else None
        choice = hard.detach().argmax(1)
        chosen = [c > 0 for c in option_counts(hard, choice)] if sparse else [True] * len(self.options)
        candidates = []
        for k, needed in enumerate(chosen):
            norms = self.norms(g, k, routed=choice == k if self.training and not self.gate_only else None)
            if needed:
                candidates.append(self.run_option(block, x, k, x_range, norms))
            else:
                with torch.no_grad():
                    candidates.append(self.run_option(block, x, k, x_range, norms).detach())
        if sparse and not all(chosen):
            # Parameters that no kept option uses (e.g. the block's convs and BNs when only skip was
            # chosen) get a zero gradient in the dense formulation (SGD then still applies weight
            # decay and momentum), not none. An exact zero term keeps them in the graph: same values.
            kept = {id(p) for k in range(len(chosen)) if chosen[k] for p in self.option_parameters(g, k)}
            unused = {id(p): p for k in range(len(chosen)) for p in self.option_parameters(g, k) if id(p) not in kept}
            if unused:
                hard = hard + 0 * sum(p.sum() for p in unused.values())
        return mix(candidates, hard)

    def run_dynamic(self, g, block, x, hard):
        """Compute only each sample's chosen option, one group of samples per option.

        In eval; and in training under a fixed routing (`routes`), where each group's BNs and activation
        ranges then see only that group's images, as a static network's see all of its images."""
        choice = hard.argmax(1)
        counts = option_counts(hard, choice)  # the one host sync per block: it decides the work
        if max(counts) == len(x):  # one option for the whole batch: no gather/scatter
            k = counts.index(len(x))
            return self.run_option(block, x, k, norms=self.norms(g, k))
        order = torch.argsort(choice, stable=True)
        groups = x.index_select(0, order).split(counts)
        out = torch.cat([self.run_option(block, group, k, norms=self.norms(g, k))
                         for k, group in enumerate(groups) if counts[k]])
        return torch.empty_like(out).index_copy_(0, order, out)

    def forced_choices(self, force_option):
        """None, [G] option indices (one per block, for every input) or a [B, G] tensor (per input)."""
        num_options, blocks = len(self.options), len(self.gate_embeds)
        if force_option is None or torch.is_tensor(force_option):
            if torch.is_tensor(force_option) and (force_option.dim() != 2 or force_option.shape[1] != blocks):
                raise ValueError(f"per-input force_option must be [batch, {blocks}], got {list(force_option.shape)}")
            return force_option
        per_block = [force_option] * blocks if isinstance(force_option, int) else list(force_option)
        if len(per_block) != blocks:
            raise ValueError(f"force_option needs one index per gated block ({blocks}), got {len(per_block)}")
        for k in per_block:
            if not (isinstance(k, int) and 0 <= k < num_options):
                raise ValueError(f"force_option must be in 0..{num_options - 1}, got {k}")
        return per_block

    def forward(self, x, execution="dynamic", force_option=None, return_probs=False):
        """execution: "dynamic" (default) computes, in eval, only the chosen options and, in
        training, back-propagates only through chosen options; "mixed" is the reference that
        computes every option with autograd and mixes them (the released code's formulation).

        force_option (the gate is then not run): an option index for every block, one index per
        gated block, or a [B, G] tensor of indices per input. Default: the static `policy`, if any.

        return_probs: also return the gate's probabilities [B, G, O] (with their graph), for the
        policy-gradient estimator and for distillation; with a [B, G] force_option the gate then runs
        beside the forced choices on the features they produce (teacher forcing).
        """
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
        routed = force_option is None and self.routes is not None
        if routed:
            force_option = self.routed_choices(x)
        forced = self.forced_choices(force_option if force_option is not None else self.policy)
        if torch.is_tensor(forced):
            if len(forced) != len(x):
                raise ValueError(f"per-input force_option has {len(forced)} rows for a batch of {len(x)}")
            forced = forced.to(x.device, non_blocking=True)  # once, not per block
        if return_probs and (isinstance(forced, list) or routed):
            raise ValueError("return_probs needs the gate to run: not with a static policy or a fixed routing")
        x = self.blocks[0](self.stem(x))  # block 1 always runs at full precision
        state = self.gate.init_state(x.shape[0], x.device, x.dtype)
        decisions, probs = [], []
        for g, (block, embed) in enumerate(zip(self.blocks[1:], self.gate_embeds)):
            if isinstance(forced, list):  # one option for the whole batch: run it alone
                hard = x.new_zeros(x.shape[0], len(self.options))
                hard[:, forced[g]] = 1
                x = self.run_option(block, x, forced[g], norms=self.norms(g, forced[g]))
                decisions.append(hard)
                continue
            if forced is None:
                p, hard, state = self.gate(embed(x), state)
            else:
                hard = torch.nn.functional.one_hot(forced[:, g], len(self.options)).to(x.dtype)
                if return_probs:  # the gate's view of the forced path
                    p, _, state = self.gate(embed(x), state)
            if return_probs:
                probs.append(p)
            if routed:  # no gate to train: every image runs only its own option, in training too
                x = self.run_dynamic(g, block, x, hard)
            elif self.training or execution == "mixed":
                x = self.run_all(g, block, x, hard, sparse=self.training and execution == "dynamic")
            else:
                x = self.run_dynamic(g, block, x, hard)
            decisions.append(hard)
        if return_probs:
            return self.head(x), torch.stack(decisions, 1), torch.stack(probs, 1)
        return self.head(x), torch.stack(decisions, 1)

    def policy_names(self):
        """The static policy as option names, one per gated block (None for the gated network)."""
        return None if self.policy is None else [self.option_names[k] for k in self.policy]

    def unused_parameters(self):
        """Parameters a static policy never uses: the gate's, and the convs and BNs of skipped blocks;
        with per-option BN, the gated blocks' shared bn1 and bn2 (every option has its own). A fixed
        routing: the gate's, and those of the blocks that both halves skip (and shared BNs as above)."""
        shared_bns = [p for b in self.blocks[1:] for p in (*b.bn1.parameters(), *b.bn2.parameters())
                      ] if self.bn == "per-option" else []
        if self.policy is None and self.routes is None:
            return shared_bns
        per_block = [[k] for k in self.policy] if self.policy is not None else self.routes.T.tolist()
        unused = [*self.gate.parameters(), *self.gate_embeds.parameters()]
        if self.routes is not None:
            unused += shared_bns
        for block, ks in zip(self.blocks[1:], per_block):
            if all(self.options[k] == "skip" for k in ks):
                unused += [p for n, p in block.named_parameters() if not n.startswith("shortcut_")]
        return unused

    def gate_keys(self):
        """State-dict keys that belong to the gate (absent from a stage-1 backbone)."""
        return {k for k in self.state_dict() if k.startswith(("gate.", "gate_embeds."))}

    def option_norm_keys(self):
        """State-dict keys of the per-option BNs (absent from a shared-BN checkpoint)."""
        return {k for k in self.state_dict() if k.startswith("option_norms.")}

    def load_shared_bn(self, state_dict):
        """Load a shared-BN gated state dict into a per-option-BN network: every option's BN starts
        as its block's shared one. Exactly the per-option keys may be missing."""
        missing, unexpected = set(self.state_dict()) - set(state_dict), set(state_dict) - set(self.state_dict())
        if self.bn != "per-option" or missing != self.option_norm_keys() or unexpected:
            raise ValueError(f"not a shared-BN state of this network: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        self.load_state_dict(state_dict, strict=False)
        copy_shared_norms(self.option_norms, self.blocks[1:])

    def load_backbone(self, state_dict):
        """Load a plain-ResNet state dict; exactly the gate's keys (and per-option BNs, which start as
        the shared ones) may be missing, nothing unexpected."""
        # Checked before loading: load_state_dict raises RuntimeError on a shape mismatch (e.g. a
        # ResNet-20 into a DFS-ResNet-38) even with strict=False, after copying what fits.
        own = self.state_dict()
        missing, unexpected = set(own) - set(state_dict), set(state_dict) - set(own)
        mismatched = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
        if missing - self.gate_keys() - self.option_norm_keys() or unexpected or mismatched:
            raise ValueError(f"not a backbone of this network: missing {sorted(missing - self.gate_keys() - self.option_norm_keys())[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}, wrong shape {mismatched[:5]}")
        self.load_state_dict(state_dict, strict=False)
        if self.bn == "per-option":
            copy_shared_norms(self.option_norms, self.blocks[1:])
        return sorted(missing)
