"""Execution options and the cost model of DFS (docs/spec.md §3-§5), defined once.

An option list is a tuple whose items are "skip", a bitwidth 1..31, or "full", e.g. the
released code's ("skip", 8, 10, 12, 14, 16, "full"). Every tensor called `decisions`
has shape [batch, gated_blocks, options] and is one-hot valued (in training it carries
the straight-through gradient of the gate's softmax).
"""
import torch

PRESETS = {
    "default": ("skip", 8, 10, 12, 14, 16, "full"),  # the released code
    "paper": ("skip", 8, 16, "full"),  # the paper's decision-distribution figures
    "skipnet": ("skip", "full"),  # layer skipping only, a SkipNet-style baseline
}


def parse_options(spec):
    """Options from a preset name, "skip,8,16,full", or a sequence; raises ValueError on bad input.

    A bitwidth of 32 means full precision. A single bitwidth gives static quantization.
    """
    if spec is None:
        spec = "default"
    if isinstance(spec, str):
        spec = PRESETS.get(spec) or [s.strip() for s in spec.split(",") if s.strip()]
    options = []
    for item in spec:
        text = str(item).lower()
        if text in ("skip", "full"):
            options.append(text)
        elif text.isdigit() and 1 <= int(text) <= 32:
            options.append("full" if int(text) == 32 else int(text))
        else:
            raise ValueError(f"unknown option {item!r}: use 'skip', 'full', a bitwidth 1-32, "
                             f"or a preset ({', '.join(PRESETS)})")
    if not options or len(set(options)) != len(options):
        raise ValueError(f"option list must be non-empty without repeats, got {list(spec)}")
    return tuple(options)


def parse_policy(spec, options, num_blocks):
    """A static policy as option indices, one per gated block; raises ValueError on bad input.

    spec: "8,8,skip,16,..." or a sequence, one option per gated block (a single one applies to
    every block); each item as in `parse_options` ("8" or "8-bit", "skip", "full"), and among `options`.
    """
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    items = [str(i).lower().removesuffix("-bit") for i in items]
    if len(items) == 1:
        items = items * num_blocks
    if len(items) != num_blocks:
        raise ValueError(f"a policy names one option per gated block: {num_blocks} expected, got {len(items)}")
    policy = []
    for item in items:
        option = parse_options([item])[0]
        if option not in options:
            raise ValueError(f"policy option {item!r} is not among the model's options {option_names(options)}")
        policy.append(options.index(option))
    return tuple(policy)


def option_bits(option):
    """Bitwidth passed to the block: an int, or None for full precision (skip has no bits)."""
    return None if option == "full" else option


def option_names(options):
    """Labels for logs and plots: 'skip', '8-bit', ..., 'full'."""
    return [o if isinstance(o, str) else f"{o}-bit" for o in options]


def option_costs(options):
    """Cost of each option relative to full precision: skip 0, b bits (b/32)^2, full 1."""
    table = {"skip": 0.0, "full": 1.0}
    return torch.tensor([table[o] if isinstance(o, str) else (o / 32) ** 2 for o in options])


def parse_costs(spec, options, num_blocks):
    """A measured cost table (a departure: the paper charges (b/32)^2) as a tensor: [O] from
    {option name: cost}, or [G, O] from a list of one such mapping per gated block. Costs are
    relative to a full-precision block; every option named exactly once; ValueError otherwise."""
    names = option_names(options)
    rows = spec if isinstance(spec, list) else [spec]
    if isinstance(spec, list) and len(rows) != num_blocks:
        raise ValueError(f"a per-block cost table needs {num_blocks} rows (one per gated block), got {len(rows)}")
    table = []
    for row in rows:
        if not isinstance(row, dict) or set(row) != set(names):
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"a cost table names each option exactly once: {names}, got {got}")
        values = [row[n] for n in names]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf") for v in values):
            raise ValueError(f"costs must be finite numbers >= 0, got {values}")
        table.append([float(v) for v in values])
    costs = torch.tensor(table)
    return costs if isinstance(spec, list) else costs[0]


def computation_percentage(decisions, costs, block_weights=None, fixed=0.0):
    """Computation percentage of a set of samples (spec §4).

    decisions: [B, G, O]; costs: [O] or [G, O], each relative to full execution of the block.
    Returns 100 * mean_samples (fixed + sum_g w_g * cost(choice_g)) / (fixed + sum_g w_g).
    The faithful default weighs every gated block equally (w = 1) and counts nothing else;
    MACs weights and a fixed part give a whole-network figure instead.
    """
    per_block = (decisions * costs).sum(-1)  # [B, G]
    if block_weights is None:
        block_weights = torch.ones_like(per_block[0])
    total = fixed + block_weights.sum()
    return 100 * (fixed + (per_block * block_weights).sum(1)).mean() / total


def cost_penalty(decisions, costs):
    """The loss's raw cost C = sum over samples, gated blocks and options of mask * cost (spec §5).

    Unnormalised on purpose: with the paper's beta its weight grows with the batch size.
    """
    return (decisions * costs).sum()
