#!/usr/bin/env bash
# Validates deploy/kubernetes/ offline:
#
#   1. every resource kustomization.yaml lists, against the Kubernetes
#      OpenAPI schemas of a pinned Kubernetes version, strictly (an unknown
#      or misspelt field is an error), with kubernetes-validate from PyPI
#      (pinned, installed into a venv under /var/tmp on first use);
#   2. that the pieces fit: the DaemonSet mounts that ConfigMap where its
#      --config points (not by subPath), follows it (--watch-config), is on
#      the host network, mounts the netns directory with HostToContainer
#      propagation, drops ALL capabilities, and probes /readyz and /healthz
#      on the port of the config's metrics_listen;
#   3. the ConfigMap's nsproxy.toml with `nsproxy check`.
#
#   scripts/k8s-validate.sh [--kubernetes-version X.Y.Z]
set -euo pipefail
cd "$(dirname "$0")/.."

validator_version=1.37.0
k8s_version=1.30.0
[ "${1:-}" = --kubernetes-version ] && k8s_version=$2
venv=/var/tmp/nsproxy-k8s-validate
dir=deploy/kubernetes

say() { echo "k8s-validate: $*" >&2; }

if ! "$venv/bin/kubernetes-validate" --version 2>/dev/null | grep -qF "$validator_version"; then
    say "installing kubernetes-validate $validator_version into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "kubernetes-validate==$validator_version"
fi
py="$venv/bin/python"

mapfile -t resources < <("$py" - "$dir/kustomization.yaml" <<'EOF'
import sys, yaml
k = yaml.safe_load(open(sys.argv[1]))
for r in k["resources"]:
    print(r)
EOF
)
[ ${#resources[@]} -gt 0 ] || { say "kustomization.yaml lists no resources"; exit 1; }
files=()
for r in "${resources[@]}"; do
    [ -f "$dir/$r" ] || { say "kustomization.yaml lists $r, which is not in $dir"; exit 1; }
    files+=("$dir/$r")
done
# Every manifest in the directory is listed (none forgotten).
for f in "$dir"/*.yaml; do
    case "$(basename "$f")" in kustomization.yaml) continue ;; esac
    printf '%s\n' "${files[@]}" | grep -qxF "$f" || { say "$f is not listed in kustomization.yaml"; exit 1; }
done

say "1. schemas of Kubernetes $k8s_version (strict): ${files[*]}"
"$venv/bin/kubernetes-validate" --strict --kubernetes-version "$k8s_version" "${files[@]}"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" - "$dir" "$tmp" <<'EOF'
import os, re, sys, yaml
d, tmp = sys.argv[1], sys.argv[2]
docs = [doc for f in os.listdir(d) if f.endswith(".yaml") and f != "kustomization.yaml"
        for doc in yaml.safe_load_all(open(os.path.join(d, f))) if doc]
by_kind = {doc["kind"]: doc for doc in docs}
cm, ds = by_kind["ConfigMap"], by_kind["DaemonSet"]
def fail(msg):
    sys.exit(f"k8s-validate: {msg}")
pod = ds["spec"]["template"]["spec"]
c = pod["containers"][0]
args = c["args"]
config = args[args.index("--config") + 1]
"--watch-config" in args or fail("the DaemonSet's args do not follow the config (--watch-config)")
key = os.path.basename(config)
key in cm["data"] or fail(f"--config {config}: the ConfigMap has no key {key}")
open(os.path.join(tmp, key), "w").write(cm["data"][key])
vols = {v["name"]: v for v in pod["volumes"]}
mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
m = mounts.get(os.path.dirname(config)) or fail(f"nothing is mounted at {os.path.dirname(config)}")
"subPath" in m and fail("the config is mounted with subPath: a ConfigMap update would never reach it")
vols[m["name"]].get("configMap", {}).get("name") == cm["metadata"]["name"] or \
    fail(f"{os.path.dirname(config)} is not the ConfigMap {cm['metadata']['name']}")
netns = mounts.get("/var/run/netns") or fail("/var/run/netns is not mounted")
netns.get("mountPropagation") == "HostToContainer" or \
    fail("/var/run/netns is mounted without mountPropagation: HostToContainer: pods made later would not be seen")
pod.get("hostNetwork") is True or fail("the DaemonSet is not on the host network")
listen = re.search(r'^metrics_listen\s*=\s*"([^"]*)"', cm["data"][key], re.M) or \
    fail("the config has no metrics_listen: the probes would find nothing")
port = int(listen.group(1).rsplit(":", 1)[1])
for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
    g = c[probe]["httpGet"]
    (g["path"], g["port"]) == (path, port) or fail(f"{probe} is {g['path']} on {g['port']}, not {path} on {port}")
caps = c["securityContext"]["capabilities"]
caps["drop"] == ["ALL"] or fail("the DaemonSet does not drop ALL capabilities")
print(f"k8s-validate: 2. the DaemonSet fits the ConfigMap ({config}, metrics port {port}, "
      f"capabilities {', '.join(caps['add'])})", file=sys.stderr)
EOF
say "3. the ConfigMap's nsproxy.toml with nsproxy check"
cargo run --quiet --bin nsproxy -- check --config "$tmp/nsproxy.toml"
say "OK"
