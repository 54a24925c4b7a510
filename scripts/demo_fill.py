"""Fill a local registry with demo content, pushed by real clients.

Usage: demo_fill.py HOST:PORT WORKDIR
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


def main() -> None:
    host, work = sys.argv[1], Path(sys.argv[2])
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    import oras.client

    oras = oras.client.OrasClient(hostname=host, insecure=True)

    # An ORAS artifact with several files.
    docs = work / "docs"
    docs.mkdir()
    (docs / "README.md").write_text("# ocifs demo\n\nThese files were pushed with oras-py.\n")
    (docs / "config.yaml").write_text("replicas: 3\nimage: demo/app:1.0\n")
    (docs / "logo.bin").write_bytes(bytes(range(256)) * 64)
    oras.push(target=f"{host}/demo/docs:1.0", files=[str(p) for p in sorted(docs.iterdir())],
              disable_path_validation=True)
    print("  oras-py   demo/docs:1.0 (3 files)")

    # A Docker volume artifact (its config media type gives its artifact type).
    volume = work / "volume"
    volume.mkdir()
    (volume / "myvolume.txt").write_text("data kept in a Docker volume artifact\n")
    (volume / "config.json").write_text("{}")
    oras.push(target=f"{host}/demo/volume:0.0.1", files=[str(volume / "myvolume.txt")],
              manifest_config=f"{volume / 'config.json'}:application/vnd.docker.volume.v1+tar.gz",
              disable_path_validation=True)
    print("  oras-py   demo/volume:0.0.1 (a volume)")

    # A Helm chart, made, packaged and pushed by Helm's own library.
    import helm_python as helm

    helm.Chart.create("webapp", work)
    archive = helm.package(work / "webapp", destination=work)
    helm.push(archive, f"oci://{host}/charts", plain_http=True)
    print(f"  helm      charts/webapp ({Path(archive).name})")

    # Container images built with umoci, copied by skopeo, and a multi-platform index.
    layout = work / "layout"
    run("umoci", "init", "--layout", str(layout))
    for arch in ("amd64", "arm64"):
        run("umoci", "new", "--image", f"{layout}:{arch}")
        hello = work / f"hello-{arch}.txt"
        hello.write_text(f"hello from a {arch} image built by umoci\n")
        run("umoci", "insert", "--image", f"{layout}:{arch}", str(hello), "/hello.txt")
        run("umoci", "config", "--image", f"{layout}:{arch}", "--architecture", arch, "--os", "linux",
            "--config.cmd", "/bin/sh")
    run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:amd64",
        f"docker://{host}/demo/app:1.0")
    print("  skopeo    demo/app:1.0 (an image built by umoci)")
    index = json.loads((layout / "index.json").read_text())
    entries = []
    for entry in index["manifests"]:
        arch = entry["annotations"]["org.opencontainers.image.ref.name"]
        entries.append({"mediaType": entry["mediaType"], "digest": entry["digest"], "size": entry["size"],
                        "platform": {"os": "linux", "architecture": arch}})
    multi = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": entries}).encode()
    digest = hashlib.sha256(multi).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(multi)
    index["manifests"].append({"mediaType": "application/vnd.oci.image.index.v1+json",
                               "digest": f"sha256:{digest}", "size": len(multi),
                               "annotations": {"org.opencontainers.image.ref.name": "multi"}})
    (layout / "index.json").write_text(json.dumps(index))
    run("skopeo", "copy", "--quiet", "--all", "--dest-tls-verify=false", f"oci:{layout}:multi",
        f"docker://{host}/demo/app:multi")
    print("  skopeo    demo/app:multi (linux/amd64 + linux/arm64)")


if __name__ == "__main__":
    main()
