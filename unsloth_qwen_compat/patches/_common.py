"""What probes share: reading upstream's compiled code.

Importing the Unsloth module a patch works on, or saying why it cannot be, is the
registry's job (``Patch.unsloth_module``, ``import_unsloth`` in ``_registry``).
"""

from __future__ import annotations


def code_mentions(function: object, *, names: tuple[str, ...] = (), text: tuple[str, ...] = ()) -> bool:
    """Whether ``function``'s compiled code uses every attribute/global in ``names`` and
    has a string constant containing each of ``text`` (nested functions included).

    Reading code objects is cheap; ``inspect.getsource`` reads and tokenizes Unsloth's
    thousand-line source files, a cost every ``import`` would pay.
    """
    function = getattr(function, "__func__", function)
    codes = []
    while function is not None:  # a decorated function: look through every wrapper
        if hasattr(function, "__code__"):
            codes.append(function.__code__)
        function = getattr(function, "__wrapped__", None)
    seen_names: set[str] = set()
    strings: list[str] = []
    pending = codes
    while pending:
        current = pending.pop()
        seen_names.update(current.co_names)
        for constant in current.co_consts:
            if isinstance(constant, str):
                strings.append(constant)
            elif hasattr(constant, "co_consts"):
                pending.append(constant)
    return all(name in seen_names for name in names) and all(
        any(fragment in string for string in strings) for fragment in text
    )
