#!/usr/bin/env bash
# Build the local control plane's binaries from pinned Go modules, once; later runs reuse them.
#
#   tests/cluster/build.sh [NAME...]     NAME in: kube-apiserver kube-controller-manager kube-scheduler kubectl etcd helm
#
# Pins live in tests/cluster/tools/{kubernetes,etcd,helm}/go.{mod,sum}. The Go module and build caches
# (GOMODCACHE, GOCACHE) and the binaries live under ~/.cache/conveyor, outside any checkout, so every clone
# and CI run on this machine shares them. A binary is rebuilt only when its module's go.mod/go.sum or its
# link flags change (a stamp file next to it records their hash).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${CONVEYOR_CACHE:-$HOME/.cache/conveyor}"
BIN="${CONVEYOR_K8S_BIN:-$CACHE/k8s/bin}"
export GOMODCACHE="${CONVEYOR_GOMODCACHE:-$CACHE/go/mod}"
export GOCACHE="${CONVEYOR_GOCACHE:-$CACHE/go/cache}"
export CGO_ENABLED=0
export GOTOOLCHAIN=local
export GOFLAGS="-buildvcs=false -mod=readonly"

# Kubernetes release the kubernetes module pins; the binaries report it (kubectl refuses v0.0.0-master).
K8S_VERSION=v1.35.4
HELM_VERSION=v3.21.4

if ! command -v go >/dev/null; then
    echo "build.sh: the Go toolchain is needed to build the control plane (install Go >= 1.25)" >&2
    exit 2
fi

k8s_ldflags() {
    local major minor flags="-s -w"
    major="${K8S_VERSION#v}"; major="${major%%.*}"
    minor="${K8S_VERSION#v*.}"; minor="${minor%%.*}"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        flags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
        flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    done
    echo "$flags"
}

helm_ldflags() {
    # Like helm's own Makefile: its default Kubernetes version (used without a cluster, e.g. `helm template`)
    # is that of the client-go it was built with.
    local cg major minor
    cg="$(cd "$HERE/tools/helm" && go list -m -f '{{.Version}}' k8s.io/client-go)"
    cg="${cg#v}"; major=$(( ${cg%%.*} + 1 )); minor="${cg#*.}"; minor="${minor%%.*}"
    local flags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
    flags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
    for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
        flags+=" -X $pkg.k8sVersionMajor=$major -X $pkg.k8sVersionMinor=$minor"
    done
    echo "$flags"
}

# build MODULE_DIR LDFLAGS NAME=PACKAGE...: one `go build` per module, so shared packages compile once.
build() {
    local module="$1" dir="$HERE/tools/$1" ldflags="$2"; shift 2
    local stamp want names=() pkgs=() todo=0
    want="$(cat "$dir/go.mod" "$dir/go.sum" <(echo "$ldflags") <(go version) | sha256sum | cut -c1-16)"
    for pair in "$@"; do
        names+=("${pair%%=*}"); pkgs+=("${pair#*=}")
        stamp="$BIN/.${pair%%=*}.stamp"
        if [[ ! -x "$BIN/${pair%%=*}" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then todo=1; fi
    done
    if (( todo == 0 )); then return 0; fi
    echo "build.sh: building ${names[*]} (module tools/$module)" >&2
    local out; out="$(mktemp -d "$BIN/.build.XXXXXX")"
    local start=$SECONDS
    (cd "$dir" && go build -trimpath -ldflags "$ldflags" -o "$out/" "${pkgs[@]}")
    local built
    for i in "${!names[@]}"; do
        # go build names each binary after its package's last path element that is not a major version.
        built="$(basename "${pkgs[$i]}")"
        if [[ "$built" =~ ^v[0-9]+$ ]]; then built="$(basename "$(dirname "${pkgs[$i]}")")"; fi
        mv -f "$out/$built" "$BIN/${names[$i]}"
        echo "$want" > "$BIN/.${names[$i]}.stamp"
    done
    rmdir "$out"
    echo "build.sh: built ${names[*]} in $(( SECONDS - start )) s" >&2
}

want_names=("$@")
if (( ${#want_names[@]} == 0 )); then
    want_names=(etcd kube-apiserver kube-controller-manager kubectl helm)
fi
wants() { local n; for n in "${want_names[@]}"; do [[ "$n" == "$1" ]] && return 0; done; return 1; }

mkdir -p "$BIN" "$GOMODCACHE" "$GOCACHE"
# One build at a time per machine: concurrent test sessions would otherwise race on the same outputs.
exec 9>"$BIN/.build.lock"
flock 9

if wants etcd; then
    # The etcd server module's root package is etcd's main package.
    build etcd "-s -w" etcd=go.etcd.io/etcd/server/v3
fi
k8s=()
for n in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    if wants "$n"; then k8s+=("$n=k8s.io/kubernetes/cmd/$n"); fi
done
if (( ${#k8s[@]} )); then
    build kubernetes "$(k8s_ldflags)" "${k8s[@]}"
fi
if wants helm; then
    build helm "$(helm_ldflags)" helm=helm.sh/helm/v3/cmd/helm
fi
for n in "${want_names[@]}"; do
    [[ -x "$BIN/$n" ]] || { echo "build.sh: unknown binary '$n'" >&2; exit 2; }
done
