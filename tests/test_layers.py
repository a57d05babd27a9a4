"""The package layout is a stack: each layer imports only the layers below it (README, Development).

Read from the source text, so a lazy import inside a function counts as much as one at the top.
"""

import re
from pathlib import Path

import kraken_hist

#: Bottom to top. ``tasks`` and ``cli`` are entry points; ``testing`` (the fake exchange) sits
#: below them because ``kraken-hist demo`` runs it.
LAYERS = ["core", "rules", "ops", "kraken", "storage", "ingest", "gaps", "query", "testing", "cli", "tasks"]
PACKAGE = Path(kraken_hist.__file__).parent
IMPORT = re.compile(r"^\s*(?:from|import) kraken_hist\.(\w+)", re.M)


def layer_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def test_every_module_belongs_to_a_layer() -> None:
    strays = {layer_of(p) for p in PACKAGE.rglob("*.py")} - set(LAYERS) - {"__init__", "__main__"}
    assert not strays, f"modules outside every layer: {sorted(strays)}; add them to README and LAYERS"


def test_no_layer_imports_one_above_it() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = layer_of(path)
        if layer not in LAYERS:
            continue
        for imported in IMPORT.findall(path.read_text()):
            if imported in LAYERS and LAYERS.index(imported) > LAYERS.index(layer):
                upward.append(f"{path.relative_to(PACKAGE)} imports kraken_hist.{imported}")
    assert not upward, "imports against the layers:\n" + "\n".join(upward)
