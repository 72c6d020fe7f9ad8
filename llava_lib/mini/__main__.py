"""``python -m llava_lib.mini build | check | serve | examples``"""
import argparse
import json
import sys
import threading
from pathlib import Path

from .. import config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_lib.mini", description="迷你世界：离线、可复现、在 CPU 上几分钟内真正学会的小世界。")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="构建迷你世界（已构建时直接复用缓存）")
    b.add_argument("--force", action="store_true", help="忽略缓存，重新构建")
    b.add_argument("--seed", type=int, default=None, help="随机种子")
    sub.add_parser("check", help="检查迷你世界，打印一行 JSON 指标")
    sub.add_parser("serve", help="在 127.0.0.1:18765 上提供迷你世界的图片（HTTP）")
    e = sub.add_parser("examples", help="从验证集导出 data_example/（NNNN.jpg + NNNN.txt）")
    e.add_argument("--out", type=Path, default=(config.repo_root() or Path.cwd()) / "data_example")
    e.add_argument("-n", type=int, default=100)
    for parser in sub.choices.values():
        parser.add_argument("--root", type=Path, default=None, help="迷你世界目录（默认 config.mini_root()）")
    args = p.parse_args(argv)

    from .build import BuildSpec, build, check, url_rewrite
    if args.cmd == "build":
        meta = build(args.root, BuildSpec() if args.seed is None else BuildSpec(seed=args.seed), force=args.force)
        print(json.dumps(meta["metrics"], ensure_ascii=False))
        return 0 if meta["metrics"].get("ok") else 1
    root = Path(args.root or config.mini_root())
    if not (root / "build.json").exists():
        print(f"迷你世界还没有构建：{root}\n  请先运行：{config.BUILD_MINI_CMD}", file=sys.stderr)
        return 2
    if args.cmd == "check":
        metrics = check(root)
        print(json.dumps(metrics, ensure_ascii=False))
        return 0 if metrics["ok"] else 1
    if args.cmd == "serve":
        from .serve import serving
        with serving(root, 18765) as base:
            print(f"迷你世界图片服务：{base}（Ctrl-C 结束）")
            threading.Event().wait()
        return 0
    from ..data import export_examples
    export_examples(root / "sa1b_eval", args.out, n=args.n, url_rewrite=url_rewrite(root))
    print(f"已导出 {args.n} 个样例到 {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
