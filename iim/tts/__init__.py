"""Text to speech with espeak-ng: prompts and SMS rendered to WAV, cached, served by signed expiring URLs.

* ``engine`` -- ``EspeakTts.render(text, voice=None) -> RenderedAudio``; ``TtsUnavailable`` means "use text".
* ``espeak`` -- libespeak-ng (from the ``espeakng-loader`` wheel) through ctypes, one synthesis at a time.
* ``urls``   -- ``AudioUrlSigner`` and the ``GET /v1/audio/{key}.wav`` route connectors' clouds fetch.
* ``generic`` -- the generic alert prompt with the IVR's instructions, from shipped recordings (no engine).
"""
