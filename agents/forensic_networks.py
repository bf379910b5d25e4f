"""The two networks forensics differentiates, for any trained algorithm.

Attacks, rollouts and diagnosis need, per agent, an actor that maps its own observation to
logits (discrete) or an action (continuous), and a centralised action-value critic
Q_j(o_1..o_N, a_1..a_N) (one-hot discrete actions), both with stacked per-agent parameters:

* MADDPG: its own actors and critics;
* HATRPO: its actors and the post-hoc probe critics fitted on frozen rollouts
  (``agents.probe_critic``, ``forensics fit-probe RUN``), as in the paper.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from agents import checkpoint
from configs.schema import ConfigError


class ForensicNetworks(NamedTuple):
    actor_apply: Any  # (params_i, obs_i) -> logits | action
    critic_apply: Any  # (params_j, obs [N, O], act [N, A]) -> Q_j
    actor_params: Any  # stacked over agents
    critic_params: Any  # stacked over agents


def forensic_networks(policy: checkpoint.Policy) -> ForensicNetworks:
    """Actor and action-value critic of a loaded run; a HATRPO run needs its probe critic
    (``FileNotFoundError`` naming the command that fits it)."""
    algo = policy.config["algo"]
    spec = policy.env.spec
    if algo["name"] == "maddpg":
        from agents import maddpg

        actor, critic = maddpg.build_networks(spec, maddpg.MaddpgConfig.from_mapping(algo))
        return ForensicNetworks(
            actor.apply, critic.apply, policy.params["actor"], policy.params["critic"]
        )
    if algo["name"] == "hatrpo":
        from agents import hatrpo, probe_critic

        actor = hatrpo.build_actor(spec, hatrpo.HatrpoConfig.from_mapping(algo))
        critic, critic_params, _ = probe_critic.load(policy.run_dir, policy.env_steps)
        return ForensicNetworks(actor.apply, critic.apply, policy.params["actor"], critic_params)
    raise ConfigError(
        f"algo.name: forensics has no networks for algorithm {algo['name']!r} "
        "(supported: maddpg, hatrpo)"
    )
