"""First on PYTHONPATH, this folder makes importing DeepSpeed fail in every process of a run
(launcher, ranks, fork servers, loader workers), with the importing stack on stderr after the
line NO_DEEPSPEED_MARKER: a test of a run that did not ask for DeepSpeed proves it never imports
it. Looking it up (importlib.util.find_spec, as Accelerate's is_deepspeed_available does) is
allowed; only an import is refused."""

import sys
import traceback

NO_DEEPSPEED_MARKER = "rsc_dist tests: deepspeed imported by a run that did not ask for it"


class _RefuseDeepSpeed:
    def find_spec(self, name, path=None, target=None):
        if name != "deepspeed" and not name.startswith("deepspeed."):
            return None
        # An import reaches here from importlib's _find_and_load_unlocked; a lookup from
        # importlib.util.find_spec (both through _find_spec, frame 1).
        if sys._getframe(2).f_code.co_name != "_find_and_load_unlocked":
            return None
        stack = "".join(traceback.format_stack())
        print(f"{NO_DEEPSPEED_MARKER}\n{stack}", file=sys.stderr, flush=True)
        raise ImportError(NO_DEEPSPEED_MARKER)


sys.meta_path.insert(0, _RefuseDeepSpeed())
