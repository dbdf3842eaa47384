# bash completion for engctl (`engctl completion bash`): engctl answers itself, without
# typer, with engine and instance names from its daemon when one runs (it never starts one).
_engctl_completion() {
    local IFS=$'\n'
    COMPREPLY=( $(_ENGCTL_COMPLETE=bash "$1" "${COMP_WORDS[@]:1:COMP_CWORD}" 2>/dev/null) )
    return 0
}

complete -o default -F _engctl_completion engctl
