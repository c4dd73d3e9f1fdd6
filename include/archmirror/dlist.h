/*
 * dlist — an intrusive circular doubly linked list (the LRU and dirty lists of the blob
 * and manifest stores).
 *
 * A node is embedded in the element it links; an empty list or an unlinked node points
 * at itself, so "is it linked" needs no flag and removal needs no list head. Header only:
 * these are a few pointer moves that belong inlined on hot paths. It never allocates and
 * knows nothing of what it links.
 */
#ifndef ARCHMIRROR_DLIST_H
#define ARCHMIRROR_DLIST_H

#include <stdbool.h>

struct am_dlink {
    struct am_dlink *prev;
    struct am_dlink *next;
};

static inline void am_dl_init(struct am_dlink *n)
{
    n->prev = n->next = n;
}

/* For a node: linked into some list. For a list head: not empty. */
static inline bool am_dl_linked(const struct am_dlink *n)
{
    return n->next != n;
}

static inline void am_dl_remove(struct am_dlink *n)
{
    n->prev->next = n->next;
    n->next->prev = n->prev;
    am_dl_init(n);
}

static inline void am_dl_push_tail(struct am_dlink *head, struct am_dlink *n)
{
    n->prev = head->prev;
    n->next = head;
    head->prev->next = n;
    head->prev = n;
}

static inline void am_dl_push_head(struct am_dlink *head, struct am_dlink *n)
{
    n->next = head->next;
    n->prev = head;
    head->next->prev = n;
    head->next = n;
}

#endif
