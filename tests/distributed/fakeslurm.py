"""A stand-in SLURM for tests: ``sbatch``, ``srun``, ``sacct`` and ``scontrol`` on one machine.

It runs the very batch scripts submitit writes, the way SLURM would, closely enough for Lightning's
SLURMEnvironment and submitit:

- ``sbatch <script>``: keeps a copy of the script (``<state>/sbatch_<id>.sh``), reads its ``#SBATCH``
  lines (nodes must be 1; ``--ntasks-per-node``, ``--job-name``, ``--array``), prints
  ``Submitted batch job <id>`` and runs the script in the background (array tasks one after another)
  with SLURM's variables: SLURM_JOB_ID, SLURM_ARRAY_*, SLURM_NTASKS, SLURM_NTASKS_PER_NODE,
  SLURM_JOB_NAME, SLURM_NODELIST=localhost, SLURM_RESTART_COUNT.
- ``srun [--opts] cmd...``: starts SLURM_NTASKS copies of ``cmd`` with SLURM_PROCID/LOCALID/NODEID, their
  output in ``--output``/``--error`` (``%j %t %A %a`` expanded), records their pids in
  ``<state>/tasks_<job id>.pids`` and waits for them.
- ``sacct``: knows nothing (submitit then waits for its result files).
- ``scontrol requeue <id>``: logs the call in ``<state>/scontrol.log`` and, as SLURM does, terminates the
  job's tasks (SIGTERM, SIGKILL after ``FAKE_SLURM_KILL_WAIT`` seconds) and runs the job's script again
  with SLURM_RESTART_COUNT + 1 — in a detached process, so the caller is not blocked. (For an array job
  it runs every array task again; the tests requeue single jobs.)

``install(bin_dir, state_dir)`` writes the four commands; put ``bin_dir`` first on PATH and set
``FAKE_SLURM_DIR=state_dir``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_COMMON = r'''
import json, os, re, signal, subprocess, sys, time
STATE = os.environ["FAKE_SLURM_DIR"]

def jobs_file():
    return os.path.join(STATE, "jobs.json")

def load_jobs():
    try:
        with open(jobs_file()) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}

def save_jobs(jobs):
    tmp = jobs_file() + ".tmp"
    with open(tmp, "w") as f:
        json.dump(jobs, f)
    os.replace(tmp, jobs_file())

def run_job(job, restart):
    """Run the job's script, every array task in turn, as SLURM would on a node."""
    opts = job["opts"]
    ntasks = int(opts.get("ntasks-per-node", "1")) * int(opts.get("nodes", "1"))
    base = dict(os.environ, SLURM_NTASKS=str(ntasks), SLURM_NTASKS_PER_NODE=str(ntasks), SLURM_NNODES="1",
                SLURM_JOB_NUM_NODES="1", SLURM_NODELIST="localhost", SLURM_JOB_NODELIST="localhost",
                SLURM_JOB_NAME=opts.get("job-name", "fake"), SLURM_RESTART_COUNT=str(restart),
                SLURM_SUBMIT_DIR=job["cwd"])
    for task in job["array"] or [None]:
        env = dict(base)
        if task is None:
            env["SLURM_JOB_ID"] = str(job["id"])
        else:
            env["SLURM_ARRAY_JOB_ID"] = str(job["id"])
            env["SLURM_ARRAY_TASK_ID"] = str(task)
            env["SLURM_JOB_ID"] = str(job["id"] + 1 + task)
        subprocess.run(["bash", job["script"]], env=env, cwd=job["cwd"])
'''

_SBATCH = r'''
script = sys.argv[-1]
text = open(script).read()
opts = {m.group(1): (m.group(2) or "") for m in re.finditer(r"^#SBATCH --([\w-]+)(?:=(.*))?$", text, re.M)}
assert opts.get("nodes", "1") == "1", "the fake SLURM has one node"
array = None
if "array" in opts:
    lo, hi = opts["array"].split("%")[0].split("-")
    array = list(range(int(lo), int(hi) + 1))
jobs = load_jobs()
job_id = int(os.environ.get("FAKE_SLURM_FIRST_ID", "4100")) + 10 * len(jobs)
kept = os.path.join(STATE, f"sbatch_{job_id}.sh")
with open(kept, "w") as f:
    f.write(text)
job = {"id": job_id, "script": kept, "opts": opts, "array": array, "cwd": os.getcwd(), "restarts": 0}
jobs[str(job_id)] = job
save_jobs(jobs)
log = open(os.path.join(STATE, f"job_{job_id}.log"), "a")
subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fakeslurm_run"),
                  str(job_id), "0"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
print(f"Submitted batch job {job_id}")
'''

_RUN = r'''
job = load_jobs()[sys.argv[1]]
restart = int(sys.argv[2])
run_job(job, restart)
'''

_SRUN = r'''
args = sys.argv[1:]
out = err = None
while args and args[0].startswith("-"):
    opt = args.pop(0)
    key, _, val = opt.partition("=")
    if key in ("--output", "-o", "--error", "-e") and not val:
        val = args.pop(0)
    if key in ("--output", "-o"):
        out = val
    elif key in ("--error", "-e"):
        err = val
ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
job_id = os.environ["SLURM_JOB_ID"]

def expand(pattern, task):
    return (pattern.replace("%j", job_id).replace("%t", str(task))
            .replace("%A", os.environ.get("SLURM_ARRAY_JOB_ID", job_id))
            .replace("%a", os.environ.get("SLURM_ARRAY_TASK_ID", "0")))

procs = []
for t in range(ntasks):
    env = dict(os.environ, SLURM_PROCID=str(t), SLURM_LOCALID=str(t), SLURM_NODEID="0", SLURM_STEP_ID="0")
    stdout = open(expand(out, t), "a") if out else None
    stderr = open(expand(err, t), "a") if err else (subprocess.STDOUT if out else None)
    procs.append(subprocess.Popen(args, env=env, stdout=stdout, stderr=stderr))
keys = [job_id]
if "SLURM_ARRAY_JOB_ID" in os.environ:  # scontrol names an array task <array job id>_<task id>
    keys.append(f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}")
for key in keys:
    with open(os.path.join(STATE, f"tasks_{key}.pids"), "w") as f:
        f.write("\n".join(str(p.pid) for p in procs))

def forward(signum, frame):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signum)

for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
    signal.signal(s, forward)
codes = [p.wait() for p in procs]
sys.exit(max(abs(c) for c in codes))
'''

_SACCT = r'''
print("JobID|State|NodeList")
'''

_SCONTROL = r'''
with open(os.path.join(STATE, "scontrol.log"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\n")
if len(sys.argv) >= 3 and sys.argv[1] == "requeue":
    log = open(os.path.join(STATE, f"requeue_{sys.argv[2]}.log"), "a")
    subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fakeslurm_requeue"),
                      sys.argv[2]], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
'''

_REQUEUE = r'''
target = sys.argv[1]
jobs = load_jobs()
job = next(j for j in jobs.values() if str(j["id"]) == target.split("_")[0])
pids_file = os.path.join(STATE, f"tasks_{target}.pids")
pids = [int(p) for p in open(pids_file).read().split()] if os.path.exists(pids_file) else []
for p in pids:  # SLURM ends the running job: SIGTERM, then SIGKILL after KillWait
    try:
        os.kill(p, signal.SIGTERM)
    except ProcessLookupError:
        pass
deadline = time.time() + float(os.environ.get("FAKE_SLURM_KILL_WAIT", "60"))
def alive(p):
    try:
        os.kill(p, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by srun) counts as gone
        with open(f"/proc/{p}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
while any(alive(p) for p in pids) and time.time() < deadline:
    time.sleep(0.1)
for p in pids:
    if alive(p):
        os.kill(p, signal.SIGKILL)
while any(alive(p) for p in pids):  # srun reaps them
    time.sleep(0.1)
time.sleep(0.5)
job["restarts"] += 1
jobs[str(job["id"])] = job
save_jobs(jobs)
run_job(job, job["restarts"])
'''


def install(bin_dir: Path, state_dir: Path) -> None:
    bin_dir, state_dir = Path(bin_dir), Path(state_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for name, body in {"sbatch": _SBATCH, "srun": _SRUN, "sacct": _SACCT, "scontrol": _SCONTROL,
                       "_fakeslurm_run": _RUN, "_fakeslurm_requeue": _REQUEUE}.items():
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{_COMMON}\n{body}")
        os.chmod(path, 0o755)
