"""The names strategy code imports from the package root resolve to the classes that do the work."""

import subprocess
import sys

import kraken_hist


def test_every_public_name_resolves_to_its_defining_module() -> None:
    for name in kraken_hist.__all__:
        value = getattr(kraken_hist, name)
        if name != "__version__":
            assert value.__name__ == name
            assert value.__module__.startswith("kraken_hist.")


def test_importing_the_package_loads_none_of_the_heavy_modules() -> None:
    code = "import sys, kraken_hist; print(sorted(m for m in sys.modules if m.startswith('kraken_hist.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        kraken_hist.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("an unknown name resolved")
