cd /work/main
M=~/.cache/r1serve/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
for i in 1 2 3; do
  .venv/bin/python bench/engine/run.py --model $M --skip-ceilings --servers llama-bench,r1serve,llama-server --r1-parallel 8 --llama-server-np 8 --concurrency 1 --quiet-wait 10 --out /tmp/exp1
  R1SERVE_IDLE_CACHE_TOKENS=0 .venv/bin/python bench/engine/run.py --model $M --skip-ceilings --servers r1serve --r1-parallel 8 --concurrency 1 --quiet-wait 10 --out /tmp/exp1/idle0
done
