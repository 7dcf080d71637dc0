"""The machinery behind the entry points at the repository root (train_*.py, eval.py, hubconf.py).

    cli          the entry points' parser: one-line usage errors (the closest option named), each default once
    settings     the three stages' command line: the authors' flags and ours, validation, what defines a run
    engine       the training engine the stage scripts share: the stage driver and its loop, checkpoints, logs
    losses       the stages' losses: cross entropy, the budget terms, the policy-gradient and distillation losses
    continuing   a run started or continued from a checkpoint: the model built and loaded, RNG state, own settings
    provenance   what made a record: code commit (-dirty), versions, CPU (model, capability, VNNI, AMX)
    assemble     a stage-3 start from two checkpoints: the backbone of one, the gate of another (python -m)
    evaluation   accuracy, computation percentage and decisions of a model; a model rebuilt from a checkpoint
    runfolder    run folders: one run per folder, one writer at a time, write failures in one line
    checkpoint   checkpoints written atomically and read with weights_only=True
    authors      the authors' released checkpoints (Torment123/DFS) read into this project's format
    distributed  several processes under torchrun: the process group, DDP and the reductions
    int8         int8 execution of the 8-bit option on CPU (eval.py --int8)
    timing       wall-clock timing, round-robin medians (eval.py --time, benchmarks/)
    plots        accuracy against computation, per-block decisions, a run's training curves
    errors       the error hierarchy (DFSError) and the exit status of each error
    intervals    the Wilson interval of an accuracy on a test set (tables, plots, model zoo)
    policy_cost  a static policy's cost in whole units, and the exact knapsack over policies (controls, search)
    correct_bits which test images a model got right, packed into a record (--per-image, --controls)

Nothing here imports the entry points or study/ (tests/test_structure.py).
"""
