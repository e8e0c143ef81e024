#!/bin/bash
cd /work/main
OUT=results/2026-12-03-smollm2-ood
common="model=smollm2 task=arithmetic limit=100 max_new_tokens=48 threads=1 task_options.few_shot=3 task_options.eval_size=1000 task_options.train_size=5000"
run() { name=$1; shift; echo "== $name: $*"; /usr/bin/time -f "%e s" .venv/bin/dfpo eval $common "$@" out=$OUT/$name.json 2>&1 | tail -4; }
run add-mixed task_options.operators=+ task_options.digits=2 task_options.min_digits=1 task_options.min_terms=2 task_options.max_terms=2
run sub-mixed task_options.operators=- task_options.digits=2 task_options.min_digits=1 task_options.min_terms=2 task_options.max_terms=2
run add3-1digit task_options.operators=+ task_options.digits=1 task_options.min_terms=3 task_options.max_terms=3
run mul-1digit task_options.operators=* task_options.digits=1 task_options.min_terms=2 task_options.max_terms=2
run addsub-mixed task_options.operators=+- task_options.digits=2 task_options.min_digits=1 task_options.min_terms=2 task_options.max_terms=2
