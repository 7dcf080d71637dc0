"""The Fashion-MNIST study and its tools (not part of the paper); each module runs as a script.

    round1           round 1: DFS vs SkipNet-style skipping vs static quantization (results/fashion-mnist)
    round2           round 2: does the per-input choice beat a static network of the same cost? (fashion-mnist-dynamic)
    round2_analysis  round 2's tables and plots from its results.json
    round3           round 3: the per-input choice or the shared BN? (fashion-mnist-round3)
    round3_analysis  round 3's tables from its results.json
    round4           round 4: can a gate learn to route per input at all? (fashion-mnist-round4)
    round4_analysis  round 4's tables from its results.json, and the plan's rules round4 runs by
    round5           round 5: what stops the gate from routing per input? (fashion-mnist-round5; tier A so far)
    round5_analysis  round 5's tables from its results.json
    search_policy    a static per-block policy at a target computation percentage, on the validation split
    significance     paired comparisons on the same images (McNemar, t-intervals) and Wilson intervals
    model_zoo        docs/model_zoo.md and .json: every released checkpoint in one table

A round's analysis imports no runner; study/ uses core/ and models/, and no module outside study/ but the
tests imports study/ (tests/test_structure.py). Run them from the repository root: `python study/round2.py --analyse-only` or `python -m study.round2 --analyse-only`.
"""
