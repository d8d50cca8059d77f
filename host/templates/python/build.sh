#!/bin/sh
# Builds {{name}}.wasm from src/ with componentize-py {{componentize_py}},
# installed once into a virtualenv under ~/.cache/warren/plugin-tools
# (or $WARREN_PLUGIN_TOOLS). Needs python3 with venv.
set -eu
cd "$(dirname "$0")"
tools="${WARREN_PLUGIN_TOOLS:-$HOME/.cache/warren/plugin-tools}/componentize-py-{{componentize_py}}"
if [ ! -e "$tools/.warren-ready" ]; then
    rm -rf "$tools"
    python3 -m venv "$tools"
    "$tools/bin/pip" install --quiet --disable-pip-version-check "componentize-py=={{componentize_py}}"
    touch "$tools/.warren-ready"
fi
"$tools/bin/componentize-py" -d wit -w plugin-script componentize -p src app -o {{name}}.wasm
