"""Shared by the analysis tests (tests/rules, tests/cinterop): picking the one action a test checks."""

def select_action(target, mnemonic, output_suffix):
    """The actions of `target` with `mnemonic` (and an output ending in `output_suffix`, if given), and the
    errors if they are not exactly one.

    Args:
      target: the target under test.
      mnemonic: e.g. SwiftCompile or SwiftLink.
      output_suffix: picks among several actions by an output's path ending; empty: no filter.

    Returns:
      (list of actions, list of error strings).
    """
    actions = [
        a
        for a in target.actions
        if a.mnemonic == mnemonic and
           (not output_suffix or [o for o in a.outputs.to_list() if o.path.endswith(output_suffix)])
    ]
    errors = []
    if len(actions) != 1:
        errors.append("{} has {} {} actions with an output ending in '{}', not 1".format(
            target.label,
            len(actions),
            mnemonic,
            output_suffix,
        ))
    return actions, errors
