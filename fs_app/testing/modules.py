"""The dialplan applications FreeSWITCH 1.10.12 has with the modules ``freeswitch-conf/autoload_configs/
modules.conf.xml`` loads (``show application`` on the real switch; the real-switch tier checks this list
against it). ``execute`` of any other name is refused the way the switch refuses it: no CHANNEL_EXECUTE,
``Invalid Application <name>`` in the log, the channel hung up with DESTINATION_OUT_OF_ORDER.
"""

from __future__ import annotations

APPLICATIONS: frozenset[str] = frozenset((
    "acknowledge_call", "answer", "att_xfer", "bgsystem", "bind_digit_action", "bind_meta_app", "block_dtmf",
    "break", "bridge", "bridge_export", "broadcast", "capture", "capture_text", "check_acl", "clear_digit_action",
    "clear_speech_cache", "cng_plc", "debug_media", "deduplicate_dtmf", "deflect", "delay_echo", "detect_audio",
    "detect_silence", "detect_speech", "digit_action_set_realm", "displace_session", "early_hangup", "eavesdrop",
    "echo", "enable_heartbeat", "enable_keepalive", "endless_playback", "eval", "event", "execute_extension",
    "export", "fax_detect", "filter_codecs", "flush_dtmf", "gentones", "hangup", "hash", "hold", "info",
    "intercept", "ivr", "jitterbuffer", "limit", "limit_execute", "limit_hash", "limit_hash_execute", "log",
    "loop_playback", "media_reset", "mkdir", "msrp_recv_file", "msrp_send_file", "multiset", "multiunset", "mutex",
    "native_eavesdrop", "novideo", "park", "park_state", "phrase", "pickup", "play_and_detect_speech",
    "play_and_get_digits", "playback", "pre_answer", "preprocess", "presence", "privacy", "push", "queue_dtmf",
    "read", "record", "record_session", "record_session_mask", "record_session_pause", "record_session_resume",
    "record_session_unmask", "recovery_refresh", "redirect", "remove_bugs", "rename", "respond",
    "reuse_caller_profile", "ring_ready", "say", "sched_broadcast", "sched_cancel", "sched_hangup",
    "sched_heartbeat", "sched_transfer", "send_display", "send_dtmf", "send_info", "session_loglevel", "set",
    "set_audio_level", "set_global", "set_media_stats", "set_mute", "set_name", "set_profile_var", "set_user",
    "set_zombie_exec", "sleep", "socket", "sofia_sla", "sofia_stir_shaken_vs", "soft_hold", "sound_test", "speak",
    "start_dtmf", "start_dtmf_generate", "stop", "stop_displace_session", "stop_dtmf", "stop_dtmf_generate",
    "stop_record_session", "stop_tone_detect", "stop_video_write_overlay", "strftime", "system", "three_way",
    "tone_detect", "transfer", "transfer_vars", "unbind_meta_app", "unblock_dtmf", "unhold", "unset", "unshift",
    "vad_test", "verbose_events", "video_decode", "video_refresh", "video_write_overlay", "wait_for_answer",
    "wait_for_silence", "wait_for_video_ready",
))
