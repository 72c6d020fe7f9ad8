#!/usr/bin/env bash
# 课程工作簿的两个入口：
#   bash run.sh        安装缺少的依赖 → 构建迷你世界 → 在迷你世界上跑完 Stage 1 → 打印结果
#   bash run.sh stage2 接着在迷你世界上跑完 Stage 2（从 Stage 1 的结果出发；还没有时先训练 Stage 1）→ 打印结果
#   bash run.sh test   安装缺少的依赖 → 运行全部测试（单元测试 + 七个笔记本的 nbval + 浏览器测试）
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

ensure_deps() {
  # PyTorch 先装：没有 torch 时，普通的 "torch" 依赖会拉下几个 GB 的 CUDA 版本。
  if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "[run.sh] 安装 PyTorch ..."
    "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q torch
  fi
  # 也检查 llava_lib 是不是“这一份”代码：笔记本的内核在 notebooks/ 里启动，靠的是可编辑安装指向这里。
  # urllib3 要 2.6.3 以上（下载重试用到 Retry 的 retry_after_max 参数）。
  if ! (cd / && "$PY" -c "import llava_lib, nbval, nbstripout, filelock, transformers, modelscope, playwright, sys, os; \
        from urllib3.util import Retry; Retry(retry_after_max=1); \
        sys.exit(os.path.dirname(os.path.dirname(os.path.realpath(llava_lib.__file__))) != os.path.realpath('$PWD'))") \
        2>/dev/null; then
    echo "[run.sh] 安装本项目及其依赖（pip install -e .[dev]）..."
    "$PY" -m pip install -q -e ".[dev]"
  fi
}

ensure_chromium() {
  # 浏览器测试用 Debian 的 chromium（不下载 Playwright 自带的浏览器）。
  if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "[run.sh] 安装 chromium（浏览器测试需要）..."
    (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null))
  fi
}

ensure_cjk_font() {
  # 浏览器测试的截图里有中文：没有中文字体时 chromium 会把字画成方框。
  if ! fc-list :lang=zh 2>/dev/null | grep -q . && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "[run.sh] 安装中文字体 fonts-wqy-microhei（浏览器测试的截图需要）..."
    apt-get install -y -q fonts-wqy-microhei >/dev/null 2>&1 \
      || (apt-get update -q >/dev/null && apt-get install -y -q fonts-wqy-microhei >/dev/null) || true
  fi
}

case "${1:-main}" in
  main)
    ensure_deps
    "$PY" -m llava_lib.mini build
    "$PY" -m llava_lib.train --profile mini --out checkpoints/stage1-mini
    ;;
  stage2)
    ensure_deps
    "$PY" -m llava_lib.mini build
    "$PY" -m llava_lib.train --stage 2 --profile mini --out checkpoints/stage2-mini
    ;;
  test)
    ensure_deps
    ensure_chromium
    ensure_cjk_font
    "$PY" -m llava_lib.mini build
    "$PY" -m pytest -q --durations=15 --nbval-lax tests notebooks
    ;;
  *)
    echo "用法：bash run.sh [main|stage2|test]" >&2
    exit 2
    ;;
esac
